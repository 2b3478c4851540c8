#!/usr/bin/env python
"""Pretrain the miniature's backbone on a shape-classification task; write safetensors + sidecar.

    .venv/bin/python bench/pretrain_backbone.py --backbone uninet_tiny \
        --out models/pretrained/uninet_tiny_shapes.safetensors      # made the shipped file

An existing ``--out`` is refused (the shipped weights are never overwritten): to reproduce
them, write to a new path (``--out /tmp/uninet_tiny_shapes.safetensors``) and compare its
sha256 with ``models/pretrained/uninet_tiny_shapes.safetensors.json``'s.

Two tasks, both from the embedded generator (:func:`agvm_ds.data.shapes.render_scene`:
gradient background, blotches, lines and dots as clutter, rotated, stretched, shaded shapes
that may overlap):

* ``crops`` (default): every object of a ``2 x size`` scene, cut out as a square 1.3 x its
  box (jittered) and resized to ``size``, is labelled with its class - neighbours, occlusion
  and clutter stay in the crop, as they do around a detector's boxes;
* ``dominant``: a whole ``size`` scene of 1-3 shapes is labelled with the class of its largest
  visible object (harder: shapes must also be compared by size; at the default budget it
  reaches far lower held-out accuracy, see docs/benchmarks.md).

Scenes come from their own random streams (``[seed, 100 + split, index]``), never the
detection benchmark's (``[seed, 0|1, index]``), so no detection image is seen here.

The network: the backbone of ``--backbone`` (``uninet_tiny``: models/faster_rcnn_uninet_tiny.json's,
whose tensors are those of retinanet_uninet_tiny.json's too; ``resnet18``: timm's resnet18 as
models/retinanet_resnet18.json builds it), its last feature map averaged and one linear layer.
Only the backbone is written, keyed as ``model.backbone_checkpoint`` loads it (0 missing keys:
checked before writing). Inputs are normalized as the detection data pipeline does (ImageNet
mean/std of [0, 1] pixels).

Deterministic from ``--seed`` at a given ``--threads`` (torch's CPU kernels may sum in another
order with another thread count): the sidecar ``<out>.json`` records the sha256 of the weights,
the command, the seed, the threads, the held-out accuracy (and the majority-class rate to
judge it by), the library versions and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKBONES = {"uninet_tiny": "models/faster_rcnn_uninet_tiny.json",
             "resnet18": "models/retinanet_resnet18.json"}
SPLITS = {"train": 100, "val": 101}  # random-stream codes; the detection benchmark uses 0 and 1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _normalized(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).contiguous()


def render_dominant(split: str, n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalized scenes [n, 3, size, size] and their dominant-shape labels [n]."""
    from agvm_ds.data.shapes import render_scene

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        image, objects, _ = render_scene(rng, size, size, max_objects=3)
        images[i] = image
        labels[i] = max(objects, key=lambda o: int(o.visible.sum())).label
    return _normalized(images), torch.from_numpy(labels)


def render_crops(split: str, n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalized object crops [n, 3, size, size] and their shape labels [n]."""
    from PIL import Image

    from agvm_ds.data.shapes import render_scene

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    k, scene = 0, 0
    while k < n:
        rng = np.random.default_rng([seed, SPLITS[split], scene])
        scene += 1
        image, objects, _ = render_scene(rng, 2 * size, 2 * size, max_objects=4)
        picture = Image.fromarray(image)
        for obj in objects:
            ys, xs = np.nonzero(obj.visible)
            if k == n or len(xs) < 20:  # a sliver left by occlusion says nothing
                continue
            side = 1.3 * max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            cx = (xs.min() + xs.max() + 1) / 2 + rng.uniform(-0.1, 0.1) * side
            cy = (ys.min() + ys.max() + 1) / 2 + rng.uniform(-0.1, 0.1) * side
            box = tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
            images[k] = np.asarray(picture.crop(box).resize((size, size), Image.BILINEAR))
            labels[k] = obj.label
            k += 1
    return _normalized(images), torch.from_numpy(labels)


TASKS = {"crops": render_crops, "dominant": render_dominant}


def build_backbone_of(name: str) -> tuple[nn.Module, nn.Module]:
    """(the backbone as the detector builds it, the module whose state dict is written)."""
    from agvm_ds.config.spec import load_spec
    from agvm_ds.models.backbones import build_backbone

    backbone = build_backbone(load_spec(REPO / BACKBONES[name]).backbone)
    return backbone, getattr(backbone, "body", backbone)  # timm: the features_only model


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.channels[-1], num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean(dim=(2, 3)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(x), batch))
    model.train()
    return hits / len(x)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="uninet_tiny")
    p.add_argument("--out", required=True, help="weights file (.safetensors); the sidecar is <out>.json")
    p.add_argument("--task", choices=sorted(TASKS), default="crops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=8000, help="training samples")
    p.add_argument("--val", type=int, default=1000, help="held-out samples")
    p.add_argument("--size", type=int, default=64, help="input side (px)")
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of reproducibility)")
    args = p.parse_args(argv)
    out, sidecar = Path(args.out), Path(str(args.out) + ".json")
    taken = [str(f) for f in (out, sidecar) if f.exists()]
    if taken:  # never over shipped weights or another run's: reproduce into a new path, compare hashes
        print(f"error: --out: {', '.join(taken)} already exists; write to a new path and compare its "
              "sha256 with the existing sidecar's", file=sys.stderr)
        return 2
    command = "python bench/pretrain_backbone.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    from safetensors.torch import save_file

    import agvm_ds  # noqa: F401  (torchvision compat before timm)
    from agvm_ds.data.shapes import SHAPE_NAMES
    from agvm_ds.models.backbones import load_backbone_weights

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    render = TASKS[args.task]
    x_train, y_train = render("train", args.train, args.seed, args.size)
    x_val, y_val = render("val", args.val, args.seed, args.size)
    t_data = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    backbone, saved = build_backbone_of(args.backbone)
    model = Classifier(backbone, len(SHAPE_NAMES)).train()
    steps_per_epoch = math.ceil(args.train / args.batch)
    steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    decay = [q for n, q in model.named_parameters() if q.ndim > 1]
    no_decay = [q for n, q in model.named_parameters() if q.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine to 0
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    order = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()
    step, perm, at = 0, torch.randperm(args.train, generator=order), 0
    while step < steps:
        if at + args.batch > args.train:  # a new epoch: drop the short tail, reshuffle
            perm, at = torch.randperm(args.train, generator=order), 0
        idx = perm[at:at + args.batch]
        at += args.batch
        xb = x_train[idx]
        flip = torch.rand(len(idx), generator=order) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
        loss = loss_fn(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t_train = time.perf_counter() - t0 - t_data
    acc = accuracy(model, x_val, y_val, 256)
    majority = float(torch.bincount(y_val, minlength=len(SHAPE_NAMES)).max()) / len(y_val)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in saved.state_dict().items()}
    # one metadata entry: safetensors writes its metadata map in hash order, so two entries
    # would give the same tensors two different files (and hashes)
    save_file(state, str(out), metadata={"format": "pt"})
    report = load_backbone_weights(out, build_backbone_of(args.backbone)[1])  # as the detector will
    if report.missing or report.unexpected:
        raise SystemExit(f"error: {out} does not load cleanly: {report.line()}")
    sidecar = {"weights": out.name, "sha256": sha256_of(out), "command": command,
               "backbone": args.backbone, "spec": BACKBONES[args.backbone], "seed": args.seed,
               "threads": args.threads, "task": args.task, "size": args.size,
               "classes": list(SHAPE_NAMES), "train_samples": args.train,
               "heldout_samples": args.val, "steps": steps,
               "heldout_accuracy": round(acc, 4), "heldout_majority_class_rate": round(majority, 4),
               "tensors": len(state), "load_report": report.line().replace(str(out), out.name),
               "seconds": {"data": round(t_data, 1), "train": round(t_train, 1)},
               "versions": {"torch": torch.__version__, "numpy": np.__version__}}
    Path(str(out) + ".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"held-out accuracy {acc:.4f} (majority class {majority:.4f}); sha256 {sidecar['sha256']}; "
          f"data {t_data:.0f} s, training {t_train:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
