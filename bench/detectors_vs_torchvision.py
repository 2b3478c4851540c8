"""Training-step time of agvm-ds's R50-FPN detectors against torchvision's, side by side (issue 26).

* **Ours**: Faster R-CNN R50-FPN and Mask R-CNN R50-FPN as the run files
  ``ds_configs/faster_rcnn_r50_fpn_sgd_bs1024.json`` / ``mask_rcnn_r50_fpn_sgd_bs1024.json``
  build them (their ``model`` sections), RetinaNet R50-FPN as ``models/retinanet_resnet18.json``
  with ``backbone.name = resnet50``; timm ResNet-50 with trainable BatchNorm, 80 classes.
* **torchvision**: ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (81 classes with
  the background) / ``retinanet_resnet50_fpn`` (80), ``weights=None, weights_backbone=None``
  (so trainable ``nn.BatchNorm2d`` and every layer trainable); the transform's
  ``normalize`` and ``resize`` are identities on the instance (the input is already
  normalized and at the target size, as ours gets it). Trainable parameters are printed per
  side: the architectures follow their libraries' defaults, so the counts differ a little
  (e.g. the box head) and the table says by how much.
* **Same input**: ``--batch`` images at ``--size`` rendered by the package's shapes generator
  (boxes and masks from the visible pixels), shared by both models.
* **Step**: ``zero_grad`` + forward + loss (sum of the loss dict) + backward + SGD step (lr
  0.01, momentum 0.9, wd 1e-4), one process, no DeepSpeed; ours and torchvision alternate
  A B A B on the same batches (bench/retinanet_vs_torchvision.py's ``measure``). Each model
  pair is measured twice, with CPU subnormals kept and flushed (``torch.set_flush_denormal``;
  agvm-ds's ``initialize`` and launcher flush by default), fresh models (seed 0) each time.

Both sides use the same detection ops (torchvision's compiled ones where they load, else
agvm-ds's pure-torch kernels, which ``import agvm_ds`` lends torchvision).

    python bench/detectors_vs_torchvision.py [--models faster mask retina] [--size 512] [--batch 2]
        [--steps 6] [--warmup 2] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import agvm_ds  # noqa: E402,F401  (first: torchvision importable, its ops lent on CPU-only torch)
from agvm_ds.data.shapes import render_scene  # noqa: E402
from agvm_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

_spec = importlib.util.spec_from_file_location("retina_bench", ROOT / "bench" / "retinanet_vs_torchvision.py")
retina_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(retina_bench)  # make_step, measure, git_head: one timing harness for both benches


def build_ours(kind: str) -> nn.Module:
    from agvm_ds.config.base import parse_section
    from agvm_ds.config.files import strip_comments
    from agvm_ds.config.inherit import read_run_file
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.models import build_model

    if kind == "retina":
        return build_model("models/retinanet_resnet18.json", overrides={"backbone.name": "resnet50"})
    run = {"faster": "faster_rcnn_r50_fpn_sgd_bs1024.json", "mask": "mask_rcnn_r50_fpn_sgd_bs1024.json"}[kind]
    section = strip_comments(read_run_file(ROOT / "ds_configs" / run))["model"]
    return build_model(parse_section(ModelConfig, section, "model"))


def build_torchvision(kind: str, size: int) -> nn.Module:
    from torchvision.models import detection

    none = dict(weights=None, weights_backbone=None, min_size=size, max_size=size)
    model = {"faster": lambda: detection.fasterrcnn_resnet50_fpn(num_classes=81, **none),
             "mask": lambda: detection.maskrcnn_resnet50_fpn(num_classes=81, **none),
             "retina": lambda: detection.retinanet_resnet50_fpn(num_classes=80, **none)}[kind]()
    model.transform.normalize = lambda image: image
    model.transform.resize = lambda image, target=None: (image, target)
    return model


def make_batches(size: int, batch: int, n: int, seed: int):
    """``n`` batches ``(images [B, 3, S, S] normalized, targets with boxes, labels, masks)``."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for b in range(n):
        images, targets = [], []
        for i in range(batch):
            image, objects, _ = render_scene(np.random.default_rng([seed, size, b, i]), size, size)
            boxes, masks = [], []
            for o in objects:
                ys, xs = np.nonzero(o.visible)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                masks.append(torch.from_numpy(o.visible.astype(np.uint8)))
            images.append((torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - mean) / std)
            targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor([o.label for o in objects], dtype=torch.int64) + 1,
                            "masks": torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.uint8)})
        out.append((torch.stack(images).contiguous(), targets))
    return out


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=("faster", "mask", "retina"), default=["faster", "mask", "retina"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model and mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"agvm-ds {retina_bench.git_head()}, torch {torch.__version__}, torchvision "
          f"{__import__('torchvision').__version__}, {platform.machine()}, {args.threads} threads, "
          f"batch {args.batch} at {args.size}², {args.warmup} warm-up + {args.steps} timed steps per model and mode")
    print("\n| model | subnormals | trainable params ours / torchvision | ours median s | torchvision median s "
          "| ratio ours/tv | paired per-step ratio, quartiles |")
    print("|---|---|---|---|---|---|---|")
    batches = make_batches(args.size, args.batch, 4, args.seed)
    results = []
    for kind in args.models:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            torch.manual_seed(args.seed)
            ours = build_ours(kind).train()
            tv = build_torchvision(kind, args.size).train()
            steps = {"ours": retina_bench.make_step(ours, "ours"), "torchvision": retina_bench.make_step(tv, "tv")}
            times, losses = retina_bench.measure(steps, batches, args.warmup, args.steps, "abba")
            med = {k: statistics.median(v) for k, v in times.items()}
            paired = [a / b for a, b in zip(times["ours"], times["torchvision"])]
            q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            row = {"model": kind, "flush_denormal": flush, "params": [trainable(ours), trainable(tv)],
                   "median_s": med, "ratio": med["ours"] / med["torchvision"], "paired_quartiles": q,
                   "times_s": times, "losses": losses}
            results.append(row)
            print(f"| {kind} R50-FPN | {'flushed' if flush else 'kept'} | {row['params'][0]:,} / "
                  f"{row['params'][1]:,} | {med['ours']:.3f} | {med['torchvision']:.3f} | {row['ratio']:.2f} | "
                  f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} |", flush=True)
    torch.set_flush_denormal(False)
    if args.json:
        args.json.write_text(json.dumps({"commit": retina_bench.git_head(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
