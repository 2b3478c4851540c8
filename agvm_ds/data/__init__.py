"""Datasets, transforms, sampling and the embedded synthetic benchmark.

Public names are imported lazily so ``python -m agvm_ds.data.synthetic`` does not import
its own module twice (runpy warns when a package pre-imports the module it runs).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetError": "agvm_ds.data.errors",
    "CocoDataset": "agvm_ds.data.coco",
    "load_coco_json": "agvm_ds.data.coco",
    "SemanticSegDataset": "agvm_ds.data.semantic",
    "Transform": "agvm_ds.data.transforms",
    "collate": "agvm_ds.data.transforms",
    "ResumableDistributedSampler": "agvm_ds.data.sampler",
    "ensure_synthetic": "agvm_ds.data.synthetic",
    "generate": "agvm_ds.data.synthetic",
    "build_dataset": "agvm_ds.data.build",
    "build_loader": "agvm_ds.data.build",
    "build_transform": "agvm_ds.data.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agvm_ds.data' has no attribute {name!r}")
