"""Evaluate a model over a dataset on one or many data-parallel ranks.

Each rank infers its shard of the evaluation set; results travel to rank 0, which scores
them, and the stats are broadcast so every rank returns the same dict. The shards are
padded to equal length (every rank runs the same number of forward passes: a model under
ZeRO-3 gathers parameters collectively in ``forward`` and would hang otherwise), and the
padded repeats are dropped before scoring, so every image counts exactly once and the
numbers equal a single-rank run.

Detection / instance segmentation: per-image COCO results are gathered to rank 0
(``gather_object``) and scored with pycocotools. Semantic segmentation: each rank sums a
``C x C`` confusion matrix; one all-reduce finishes it (no per-pixel data moves).
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import torch

from agvm_ds import collectives
from agvm_ds.data.sampler import ResumableDistributedSampler
from agvm_ds.data.transforms import collate, unpad_groups
from agvm_ds.evaluation.coco_eval import evaluate_results
from agvm_ds.evaluation.miou import confusion_matrix, miou_from_confusion
from agvm_ds.evaluation.results import to_coco_results


def _world() -> tuple[int, int]:
    return collectives.world(), collectives.rank()


def infer_task(dataset) -> str:
    """"semantic" for label-map datasets, else the dataset's ``task`` (detection|instance)."""
    if hasattr(dataset, "load_sem_seg"):
        return "semantic"
    return getattr(dataset, "task", "detection")


@torch.no_grad()
def evaluate_dataset(model_or_predict: Callable, dataset, batch_size: int = 1,
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     iou_types: Sequence[str] | None = None, results_file: str | None = None,
                     collate_fn: Callable = collate, size_divisibility: int = 32) -> dict:
    """Run inference over ``dataset`` (sharded across ranks) and return its stats.

    Args:
        model_or_predict: a model with ``predict(images, targets)`` (put in eval mode for
            the call and restored after) or such a callable itself.
        dataset: a :class:`~agvm_ds.data.coco.CocoDataset` or
            :class:`~agvm_ds.data.semantic.SemanticSegDataset` built with ``train=False``.
        iou_types: default ``("bbox",)`` for detection, ``("bbox", "segm")`` for instance.
        results_file: rank 0 writes the merged COCO results there (detection tasks).
        size_divisibility: the multiple ``collate_fn`` pads to; a batch is cut into groups
            each padded as its images alone would be (:func:`predict_unpadded`), so the
            stats do not depend on ``batch_size`` or the number of ranks.

    Returns:
        The same dict on every rank: the 12 COCO stats per IoU type (``bbox_AP`` …), or
        ``mIoU``/``mAcc``/``aAcc``/``IoU`` for semantic segmentation.
    """
    model = model_or_predict if hasattr(model_or_predict, "predict") else None
    predict = model.predict if model is not None else model_or_predict
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        return _evaluate(predict, dataset, batch_size, device, num_workers, iou_types,
                         results_file, collate_fn, size_divisibility)
    finally:
        if was_training:
            model.train()


def predict_unpadded(predict: Callable, images: torch.Tensor, targets: list[dict],
                     device: str | torch.device = "cpu", size_divisibility: int = 32) -> list:
    """``predict`` over a collated batch, each image padded only as in a batch of its own
    (:func:`~agvm_ds.data.transforms.unpad_groups`): same-size images still run together,
    and no result depends on the batch size or on which rank's shard an image fell in.

    Every rank makes the same number of ``predict`` calls (a ZeRO-3 module gathers its
    parameters collectively in ``forward``): ranks agree on the most groups any of them
    has in this batch, and one with fewer repeats its first image's call, result unused.
    """
    preds: list = [None] * len(targets)
    groups = unpad_groups(images, targets, size_divisibility)
    calls = len(groups)
    if collectives.world() > 1:  # evaluation only: one tiny all-gather per batch
        # on the eval device: NCCL takes only accelerator tensors (gloo takes both)
        calls = max(int(c) for c in collectives.all_gather(torch.tensor([calls], device=device)))
    for idx, crop, group in groups:
        out = predict(crop.to(device), group)
        if len(out) != len(group):
            raise ValueError(f"evaluate_dataset: predict returned {len(out)} results for a "
                             f"batch of {len(group)} images")
        for k, pred in zip(idx, out):
            preds[k] = pred
    for _ in range(calls - len(groups)):
        predict(groups[0][1][:1].to(device), groups[0][2][:1])
    return preds


def _evaluate(predict, dataset, batch_size, device, num_workers, iou_types, results_file,
              collate_fn, size_divisibility) -> dict:
    world, rank = _world()
    task = infer_task(dataset)
    n = len(dataset)
    sampler = ResumableDistributedSampler(n, world, rank, shuffle=False, even=True)
    indices = list(sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices,
                                         num_workers=num_workers, collate_fn=collate_fn)
    per_image: list[tuple[int, list]] = []  # (dataset index, COCO results of that image)
    cm = torch.zeros(getattr(dataset, "num_classes", 1), getattr(dataset, "num_classes", 1),
                     dtype=torch.int64)
    position = 0
    for images, targets in loader:
        preds = predict_unpadded(predict, images, targets, device, size_divisibility)
        for pred, target in zip(preds, targets):
            index = indices[position]
            padding = rank + position * world >= n  # a wrapped-around repeat, not scored
            position += 1
            if padding:
                continue
            if task == "semantic":
                cm += confusion_matrix(pred["sem_seg"], dataset.load_sem_seg(index),
                                       dataset.num_classes)
            else:
                per_image.append((index, to_coco_results([pred], [target["image_id"]],
                                                         dataset.cat_ids)))
    if task == "semantic":
        # Summed on the accelerator's device (NCCL takes no CPU tensors): C x C integers.
        cm = collectives.all_reduce_sum(cm)
        return miou_from_confusion(cm, getattr(dataset, "class_names", None))
    if iou_types is None:
        iou_types = ("bbox", "segm") if task == "instance" else ("bbox",)
    gathered = collectives.gather_objects(per_image, dst=0)
    stats, error = None, None
    if rank == 0:
        try:
            merged = sorted((item for part in gathered for item in part), key=lambda t: t[0])
            results = [r for _, rs in merged for r in rs]
            if results_file is not None:
                with open(results_file, "w") as f:
                    json.dump(results, f)
            stats = evaluate_results(dataset.coco, results, iou_types,
                                     image_ids=[dataset.ids[i] for i, _ in merged])
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if world > 1:  # broadcast the outcome, failure included, so no rank waits forever
        stats, message = collectives.broadcast_object(
            (stats, None if error is None else f"{type(error).__name__}: {error}"), src=0)
        if message is not None and error is None:
            raise RuntimeError(f"evaluation failed on rank 0: {message}")
    if error is not None:
        raise error
    return stats

