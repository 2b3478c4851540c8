"""Distributed evaluation of the engine's model during and after training.

A thin adapter over :func:`agvm_ds.evaluation.distributed.evaluate_dataset`: every rank
predicts its (padded, equal-length) shard, rank 0 scores the gathered COCO results (or the
all-reduced confusion matrix), and every rank gets the same stats back. Images are moved
to the engine's device and cast to the dtype of the model's parameters (bf16 / fp16 runs).

Notes:
    Under ZeRO-3 the model's parameters are partitioned; its forward hooks gather them
    collectively, which is why every rank runs the same number of forward passes.
"""

from __future__ import annotations

from typing import Optional

import torch


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def evaluate(engine, run, val_set, batch_size: int, rank: int, world: int) -> Optional[dict]:
    """Stats dict (``bbox_AP`` …, ``segm_AP`` …, or ``mIoU`` …), identical on every rank."""
    from agvm_ds.evaluation.distributed import evaluate_dataset

    if val_set is None:
        return None
    module = engine.module
    dtype = _param_dtype(module)
    device = engine.device

    def predict(images, targets):
        return module.predict(images.to(device=device, dtype=dtype), targets)

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            stats = evaluate_dataset(predict, val_set, batch_size=batch_size, device=device,
                                     num_workers=run.data.num_workers)
    finally:
        module.train(was_training)
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in stats.items()}
