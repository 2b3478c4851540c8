"""Build datasets and loaders from a validated :class:`~agvm_ds.config.data.DataConfig`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from agvm_ds.config.data import DataConfig
from agvm_ds.config.files import REPO_ROOT
from agvm_ds.data.coco import CocoDataset
from agvm_ds.data.sampler import ResumableDistributedSampler
from agvm_ds.data.semantic import SemanticSegDataset
from agvm_ds.data.synthetic import ensure_synthetic
from agvm_ds.data.augment import build_step
from agvm_ds.data.transforms import Transform, collate


def default_cache_dir() -> Path:
    """``$AGVM_DS_DATA_CACHE``, else ``<repo>/.cache/data`` for a source checkout, else
    ``~/.cache/agvm_ds/data`` (an installed package has no repo folder to write into)."""
    env = os.environ.get("AGVM_DS_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / ".cache" / "data"
    return Path.home() / ".cache" / "agvm_ds" / "data"


def dataset_root(cfg: DataConfig, announce=None) -> Path:
    """The dataset folder: ``cfg.root``, or the synthetic benchmark (generated if needed;
    ``announce(line)`` is told when a generation starts and ends)."""
    if cfg.root is not None:
        return Path(cfg.root).expanduser()
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    s = cfg.synthetic
    return ensure_synthetic(cache, s.train, s.val, s.seed, s.size, s.workers, announce=announce)


def build_transform(cfg: DataConfig, train: bool) -> Transform:
    """Training: ``data.transforms`` (or resize + flip without it). Evaluation: the resize
    to ``eval_min_size`` only, whatever ``data.transforms`` holds (crops and jitter are for
    training; evaluation maps predictions back through the resize and flip alone)."""
    if not train:
        return Transform(cfg.eval_min_size, cfg.max_size, 0.0, cfg.mean, cfg.std)
    if cfg.transforms is None:
        return Transform(cfg.min_size, cfg.max_size, cfg.flip_prob, cfg.mean, cfg.std)
    steps = [build_step(step, cfg.min_size, cfg.max_size) for step in cfg.transforms]
    return Transform(None, None, 0.0, cfg.mean, cfg.std, steps=steps)


def build_dataset(cfg: DataConfig, split: str, train: bool):
    """A :class:`CocoDataset` (detection/instance) or :class:`SemanticSegDataset`.

    ``split`` is a split name used in the path templates (e.g. ``"val2017"``); the role
    names ``"train"`` and ``"val"`` map to ``cfg.train_split`` / ``cfg.val_split``.
    ``train=True`` enables random flip / multi-scale and, with ``data.filter_empty`` (the
    default), skips images without annotations.
    """
    if isinstance(cfg, dict):
        cfg = DataConfig.model_validate(cfg)
    split = {"train": cfg.train_split, "val": cfg.val_split}.get(split, split)
    root = dataset_root(cfg)
    transform = build_transform(cfg, train)
    # which image files already passed the header check (agvm_ds.data.headers)
    headers = (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()) / "image_headers"
    if cfg.task == "semantic":
        return SemanticSegDataset(root, split, image_dir=cfg.image_dir, label_dir=cfg.sem_seg_dir,
                                  ann_file=cfg.ann_file, num_classes=cfg.semantic_classes,
                                  reduce_zero_label=cfg.reduce_zero_label, transform=transform,
                                  image_memo_bytes=cfg.image_memo_mb << 20, header_cache=headers)
    return CocoDataset(root, split, task=cfg.task, image_dir=cfg.image_dir, ann_file=cfg.ann_file,
                       transform=transform, train=train,
                       skip_invalid_boxes=cfg.skip_invalid_boxes,
                       image_memo_bytes=cfg.image_memo_mb << 20, filter_empty=cfg.filter_empty,
                       header_cache=headers)


def build_loader(cfg: DataConfig, dataset, batch_size: int, train: bool,
                 num_replicas: int | None = None, rank: int | None = None, seed: int = 0,
                 start_index: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's shard with :func:`collate`.

    Training: shuffled, resumable (``start_index`` = global samples already consumed in
    the current epoch), ``drop_last`` so every rank runs the same number of full batches;
    call ``loader.sampler.set_epoch(epoch)`` each epoch. Evaluation: dataset order.
    """
    sampler = ResumableDistributedSampler(dataset, num_replicas, rank, shuffle=train, seed=seed,
                                          start_index=start_index, drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=cfg.num_workers, collate_fn=collate,
                                       drop_last=train, persistent_workers=cfg.num_workers > 0)
