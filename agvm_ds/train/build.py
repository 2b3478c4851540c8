"""``build_*`` functions the launcher composes: param groups, lr, datasets, model, engine.

Notes:
    Param groups are cut per AGVM module (and, unless ``train.norm_bias_decay``, into
    decay / no-decay), so every group belongs to exactly one module — DeepSpeed flattens
    and partitions each group on its own, which keeps AGVM's per-module sums exact under
    ZeRO (design §2). Each group carries ``"module"`` and ``"base_lr"``; the schedule
    writes ``lr = base_lr * factor`` before every step.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from agvm_ds.config.base import ConfigError
from agvm_ds.config.run import RunConfig
from agvm_ds.train.schedule import scaled_lr

logger = logging.getLogger("agvm_ds.train")


def build_param_groups(model: nn.Module, weight_decay: float, base_lr: float,
                       norm_bias_decay: bool = False) -> list[dict[str, Any]]:
    """One group per (AGVM module, decay or not), anchor's first; frozen params left out.

    Uses the core's partition rules (every trainable parameter in exactly one module,
    longest prefix wins); each group also gets ``lr`` and ``base_lr``.
    """
    from agvm_ds.core.partition import build_param_groups as _groups
    from agvm_ds.core.partition import model_partition, resolve_partition

    modules, _anchor = model_partition(model)
    owner = resolve_partition(model, modules)
    groups = _groups(model, owner, list(modules), weight_decay=weight_decay,
                     no_decay_norms=not norm_bias_decay)
    for g in groups:
        g.update(lr=base_lr, base_lr=base_lr)
    return groups


def choose_lr(run: RunConfig) -> tuple[float, Optional[str]]:
    """The base lr and, when the batch-scaling rule picked it, a line to log."""
    params = run.deepspeed["optimizer"].setdefault("params", {})
    rule = run.train.lr_scaling
    if rule is None:
        return float(params["lr"]), None
    lr = scaled_lr(rule, run.global_batch)
    how = "linear" if rule.sqrt_above is None or run.global_batch <= rule.sqrt_above else "sqrt"
    sqrt = f", sqrt above {rule.sqrt_above}" if rule.sqrt_above else ""
    replaced = f"; replaces optimizer.params.lr={params['lr']}" if "lr" in params else ""
    note = (f"lr scaling ({how}): global batch {run.global_batch} -> lr {lr:.6g} "
            f"(base {rule.base_lr:g} per {rule.base_batch} images{sqrt}{replaced})")
    params["lr"] = lr
    return lr, note


def build_model(run: RunConfig, num_classes: Optional[int] = None) -> nn.Module:
    """The ``model`` section's network; ``num_classes`` (the dataset's) must match the section's."""
    if num_classes is not None and num_classes != run.model.num_classes:
        raise ConfigError(f"model.num_classes: {run.model.num_classes} but the dataset has "
                          f"{num_classes} classes")
    return run.model.build()


def build_datasets(run: RunConfig, rank: int = 0, need_val: bool = True):
    """(train set, val set or None) for the ``data`` section.

    With ``data.root`` null the synthetic benchmark is generated on first use; rank 0 does
    it while the others wait at a barrier (the generator also holds a file lock).
    """
    from agvm_ds import collectives
    from agvm_ds.data import build_dataset

    if run.data.root is None and collectives.world() > 1:
        if rank == 0:
            from agvm_ds.data.build import dataset_root

            dataset_root(run.data)
        collectives.barrier()
    train = build_dataset(run.data, "train", train=True)
    val = build_dataset(run.data, "val", train=False) if need_val else None
    return train, val


def build_engine(run: RunConfig, model: nn.Module, groups: list[dict[str, Any]]):
    """``agvm_ds.initialize`` on the run's DeepSpeed sections + ``agvm``; returns the engine."""
    import agvm_ds

    engine, _optimizer, _loader, _sched = agvm_ds.initialize(
        model=model, config=run.initialize_config(), modules=None, model_parameters=groups)
    return engine
