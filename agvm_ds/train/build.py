"""``build_*`` functions the launcher composes: param groups, datasets, model.

Notes:
    Param groups are cut per AGVM module (and, unless ``train.norm_bias_decay``, into
    decay / no-decay), so every group belongs to exactly one module — DeepSpeed flattens
    and partitions each group on its own, which keeps AGVM's per-module sums exact under
    ZeRO. Each group carries ``"module"`` and ``"base_lr"``; the schedule
    writes ``lr = base_lr * factor`` before every step.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from agvm_ds.errors import ConfigError
from agvm_ds.config.run import RunConfig
from agvm_ds.partition import Partition, param_groups

logger = logging.getLogger("agvm_ds.train")


def build_param_groups(model: nn.Module, partition: Partition, weight_decay: float, base_lr: float,
                       norm_bias_decay: bool = False) -> list[dict[str, Any]]:
    """:func:`agvm_ds.partition.param_groups` for the run's resolved ``partition`` (resolved
    once by the launcher, which hands the same object to the engine); each group also gets
    ``lr`` and ``base_lr``, which the schedule scales."""
    groups = param_groups(model, partition, weight_decay, norm_bias_decay=norm_bias_decay)
    for g in groups:
        g.update(lr=base_lr, base_lr=base_lr)
    return groups


def build_model(run: RunConfig, num_classes: Optional[int] = None) -> nn.Module:
    """The ``model`` section's network; ``num_classes`` (the dataset's) must match the section's."""
    if num_classes is not None and num_classes != run.model.num_classes:
        raise ConfigError(f"model.num_classes: {run.model.num_classes} but the dataset has "
                          f"{num_classes} classes")
    from agvm_ds.models import build_from_section

    return build_from_section(run.model, trust_code=True)  # the launcher runs the code its run file names


def build_datasets(run: RunConfig, rank: int = 0, need_val: bool = True, announce=None):
    """(train set, val set or None) for the ``data`` section.

    With ``data.root`` null the synthetic benchmark is generated on first use; rank 0 does
    it (telling ``announce(line)`` when it starts and ends) while the others wait at a
    barrier (the generator also holds a file lock).
    """
    from agvm_ds import collectives
    from agvm_ds.data import build_dataset

    if run.data.root is None:
        if rank == 0:
            from agvm_ds.data.build import dataset_root

            dataset_root(run.data, announce=announce)
        if collectives.world() > 1:
            collectives.barrier()
    train = build_dataset(run.data, "train", train=True)
    val = build_dataset(run.data, "val", train=False) if need_val else None
    if val is not None and val.num_classes != train.num_classes:
        # build_model compares the train split with the model; a val split with another
        # count would fail (or score wrong ids) only at the first evaluation, hours in
        raise ConfigError(f"{_source(val)}: the val split has {val.num_classes} classes but the "
                          f"train split ({_source(train)}) has {train.num_classes}")
    return train, val


def _source(dataset) -> str:
    """The file that defines a dataset's classes (COCO: the annotation file)."""
    return str(getattr(dataset, "ann_file", None) or getattr(dataset, "root", "the dataset"))
