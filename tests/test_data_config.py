"""The ``data`` config section and build_dataset / build_loader."""

from __future__ import annotations

import pytest
import torch

from agvm_ds.config.base import parse_section
from agvm_ds.errors import ConfigError
from agvm_ds.config.data import DataConfig
from agvm_ds.data.build import build_dataset, build_loader
from agvm_ds.data.coco import CocoDataset
from agvm_ds.data.semantic import SemanticSegDataset


def test_defaults_and_validation():
    cfg = parse_section(DataConfig, None, "data")
    assert cfg.root is None and cfg.task == "detection" and cfg.eval_min_size == 128
    assert parse_section(DataConfig, {"min_size": [96, 160]}, "data").eval_min_size == 160
    bad = [({"flip_prob": 1.5}, "data.flip_prob"), ({"colour": 1}, "data.colour: unknown key"),
           ({"synthetic": {"train": 0}}, "data.synthetic.train"),
           ({"synthetic": {"sead": 1}}, "data.synthetic.sead: unknown key"),
           ({"task": "panoptic"}, "data.task"), ({"min_size": []}, "data.min_size"),
           ({"std": [1, 0, 1]}, "data.std"), ({"image_dir": "{year}"}, "data.image_dir"),
           ({"num_workers": -1}, "data.num_workers"),
           ({"train_split": "train2017"}, "synthetic benchmark")]
    for data, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_section(DataConfig, data, "data")
    assert parse_section(DataConfig, {"root": "/x", "train_split": "train2017"}, "data").root == "/x"


def test_build_from_synthetic_cache(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), synthetic={"train": 6, "val": 3, "size": 64},
                     min_size=64, max_size=96, task="instance")
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert isinstance(train, CocoDataset) and train.task == "instance" and len(val) == 3
    assert val.transform.flip_prob == 0.0 and train.transform.flip_prob == 0.5
    image, target = val[0]
    assert min(image.shape[1:]) == 64 and target["masks"].shape[1:] == image.shape[1:]
    loader = build_loader(cfg, train, batch_size=2, train=True, num_replicas=2, rank=0, seed=1)
    images, targets = next(iter(loader))
    assert images.shape[0] == 2 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert len(loader) == len(train) // 2 // 2
    semantic = build_dataset(cfg.model_copy(update={"task": "semantic"}), "val", train=False)
    assert isinstance(semantic, SemanticSegDataset) and semantic.num_classes == 7
    assert semantic.ids == val.ids and semantic[0][1]["sem_seg"].dtype == torch.int64
    # generated into the configured cache, not the default one: every dataset reads from a
    # folder inside tmp_path that holds the split's annotations and images
    for ds in (train, val, semantic):
        assert ds.root.parent == tmp_path, ds.root
        assert ds.image_root.is_dir() and any(ds.image_root.iterdir()), ds.image_root
    assert train.ann_file.is_file() and val.ann_file.is_file() and val.ann_file != train.ann_file
    assert train.root == val.root == semantic.root


def test_readme_states_the_path_template_defaults():
    # issue 32: the defaults of image_dir / ann_file / sem_seg_dir are written in README's data table
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `image_dir`, `ann_file`, `sem_seg_dir` |"))
    stated = [v.strip().strip("`") for v in row.split("|")[2].split(",")]
    fields = DataConfig.model_fields
    assert stated == [fields[k].default for k in ("image_dir", "ann_file", "sem_seg_dir")], row
