"""Training-step time of the project's RetinaNet-R18 against torchvision's RetinaNet built
to the same design, side by side in one process (issue 13, acceptance line 3).

* **Ours**: ``agvm_ds.models.build_model("models/retinanet_resnet18.json")`` — timm
  ``resnet18`` (trainable ``nn.BatchNorm2d``), FPN P3-P5 from the backbone plus P6/P7 by
  stride-2 convs (P6 from the P5 output, P7 from ReLU(P6)), 4+4 conv head without norm,
  9 anchors per location, 80 classes, focal loss + smooth-L1.
* **torchvision**: ``torchvision.models.detection.RetinaNet`` on
  ``resnet_fpn_backbone("resnet18", weights=None, norm_layer=nn.BatchNorm2d,
  trainable_layers=5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))``,
  its stock ``RetinaNetHead`` (4 conv + ReLU per tower, no norm), an ``AnchorGenerator``
  with our exact sizes (``size_per_stride * stride * 2**(i/3)``) and aspect ratios,
  ``num_classes`` 80, the same matcher thresholds (0.5 / 0.4, low-quality matches on) and
  the regression loss switched to smooth-L1 (``regression_head._loss_type``).
* **Same input**: both get the same already-normalized batch at the target size.
  torchvision's ``GeneralizedRCNNTransform`` has its ``normalize`` and ``resize`` replaced by
  identities on this instance (the stock resize would bilinearly interpolate even at scale
  1.0, a cost ours never pays since resizing is in our data pipeline); what is left of the
  transform — copying the target dicts and ``batch_images`` padding the list of images into
  a new batch tensor (a plain copy: 320 and 512 are multiples of 32) — stays inside
  torchvision's timed step.
* **Step**: ``zero_grad`` + forward + loss (sum of the loss dict) + backward + SGD step
  (lr 0.01, momentum 0.9, weight decay 1e-4, the same for both), single process, no
  DeepSpeed. Steps interleave A B A B … on identical batches rendered by the package's
  synthetic shapes generator (``agvm_ds.data.shapes.render_scene``: 1-4 objects, boxes
  from their visible masks). Median over ``--steps`` timed steps after ``--warmup``.

Usage (under the CPU lock on the shared 2-core machine):
  flock /tmp/cpu.lock python bench/retinanet_vs_torchvision.py --threads 1 2 --sizes 320 512 --profile 320
  (``--order ba``: torchvision first in each pair; ``--profile SIZE``: torch.profiler op
  table of both models side by side; ``--steps 0 --profile SIZE``: the profile alone)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import agvm_ds  # noqa: E402,F401  (its compat step makes torchvision importable on CPU torch)
from agvm_ds.data.shapes import render_scene  # noqa: E402
from agvm_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from agvm_ds.models import build_model  # noqa: E402

SPEC = "models/retinanet_resnet18.json"


# -- the two models -------------------------------------------------------------------
def build_ours():
    return build_model(SPEC)


def build_torchvision(ours, size: int):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    spec = ours.spec
    assert spec.backbone.name == "resnet18" and list(spec.backbone.out_indices) == [2, 3, 4]
    assert spec.backbone.norm == "bn" and spec.neck.norm == "none" and spec.head.norm == "none"
    assert spec.neck.extra_levels == 2 and spec.neck.extra_mode == "conv"
    assert spec.head.num_convs == 4 and spec.head.box_loss == "smooth_l1"
    channels = spec.neck.out_channels
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(channels, channels))
    a = spec.head.anchors
    strides = ours.neck.strides  # [8, 16, 32, 64, 128]
    sizes = tuple(tuple(a.size_per_stride * s * 2 ** (i / a.scales_per_octave)
                        for i in range(a.scales_per_octave)) for s in strides)
    anchors = AnchorGenerator(sizes, (tuple(a.aspect_ratios),) * len(strides))
    head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], spec.num_classes)
    head.regression_head._loss_type = "smooth_l1"
    model = RetinaNet(backbone, spec.num_classes, min_size=size, max_size=size,
                      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                      anchor_generator=anchors, head=head,
                      fg_iou_thresh=spec.head.fg_iou, bg_iou_thresh=spec.head.bg_iou)
    # the input is already normalized and at the target size: no per-step normalize/resize
    model.transform.normalize = lambda image: image
    model.transform.resize = lambda image, target=None: (image, target)
    return model


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_table(ours, tv) -> list[tuple[str, int, int]]:
    rows = [("backbone (ResNet-18 body)", count(ours.backbone), count(tv.backbone.body)),
            ("FPN incl. P6/P7", count(ours.neck), count(tv.backbone.fpn)),
            ("head", count(ours.head), count(tv.head)),
            ("total", count(ours), count(tv))]
    frozen = sum(p.numel() for p in tv.parameters() if not p.requires_grad)
    assert frozen == 0, f"torchvision model has {frozen} frozen parameters"
    return rows


# -- data -----------------------------------------------------------------------------
def make_batches(size: int, batch: int, n: int, seed: int):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for b in range(n):
        images, targets = [], []
        for i in range(batch):
            rng = np.random.default_rng([seed, size, b, i])
            image, objects, _ = render_scene(rng, size, size)
            boxes, labels = [], []
            for o in objects:
                ys, xs = np.nonzero(o.visible)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(o.label)
            pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
            images.append((pixels - mean) / std)
            targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        out.append((torch.stack(images).contiguous(), targets))
    return out


# -- one training step ----------------------------------------------------------------
def make_step(model, kind: str):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(images, targets):
        opt.zero_grad(set_to_none=True)
        targets = [dict(t) for t in targets]
        losses = model(images, targets) if kind == "ours" else model(list(images.unbind(0)), targets)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def measure(steps_by_name, batches, warmup: int, timed: int, order: str = "ab"):
    times = {name: [] for name in steps_by_name}
    losses = {name: [] for name in steps_by_name}
    names = list(steps_by_name)
    for k in range(warmup + timed):
        images, targets = batches[k % len(batches)]
        first_b = order == "ba" or (order == "abba" and k % 2 == 1)
        for name in names[::-1] if first_b else names:  # A B A B ... (or B A, or A B B A)
            step = steps_by_name[name]
            t0 = time.perf_counter()
            loss = step(images, targets)
            dt = time.perf_counter() - t0
            losses[name].append(loss)
            if k >= warmup:
                times[name].append(dt)
    return times, losses


def profile(steps_by_name, batches, n: int = 3, rows: int = 16):
    """Self-CPU ms per step of each op, both models side by side (the ops that differ most)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    per_op, summary = {}, {}
    for name, step in steps_by_name.items():
        step(*batches[0])  # warm
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(n):
                step(*batches[k % len(batches)])
        events = prof.key_averages()
        per_op[name] = {e.key: (e.self_cpu_time_total / n / 1e3, e.count / n) for e in events}
        summary[name] = (sum(v[0] for v in per_op[name].values()),
                         sum(v[1] for v in per_op[name].values()))
    a, b = list(steps_by_name)
    print(f"\ntorch.profiler, {n} steps each: self-CPU ms per step (op calls per step)")
    for name, (ms, calls) in summary.items():
        print(f"  {name}: {ms:.0f} ms, {calls:.0f} op calls")
    keys = set(per_op[a]) | set(per_op[b])
    get = lambda m, k: per_op[m].get(k, (0.0, 0.0))  # noqa: E731
    top = sorted(keys, key=lambda k: -max(get(a, k)[0], get(b, k)[0]))[:rows]
    diff = sorted(set(keys) - set(top), key=lambda k: -abs(get(a, k)[0] - get(b, k)[0]))[:6]
    print(f"\n| op | {a} ms | {a} calls | {b} ms | {b} calls |\n|---|---|---|---|---|")
    for k in top + diff:
        (ma, ca), (mb, cb) = get(a, k), get(b, k)
        print(f"| {k} | {ma:.1f} | {ca:.0f} | {mb:.1f} | {cb:.0f} |")


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch.set_num_threads values, one measurement each (default 1)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 512], help="square input sizes (px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="distinct synthetic batches, cycled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=("ab", "ba", "abba"), default="ab",
                    help="who goes first in each pair: ours (ab), torchvision (ba), alternating (abba)")
    ap.add_argument("--profile", type=int, default=None, metavar="SIZE",
                    help="after timing, print torch.profiler op tables of both models at SIZE "
                         "(with the first --threads value)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    ours = build_ours().train()
    tv = build_torchvision(ours, max(args.sizes)).train()
    print(f"agvm-ds {git_head()}, torch {torch.__version__}, "
          f"torchvision {__import__('torchvision').__version__}, {platform.processor() or platform.machine()}, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, order {args.order}")
    print("\ntrainable parameters | ours | torchvision")
    params = parameter_table(ours, tv)
    for label, a, b in params:
        print(f"  {label:<28} {a:>12,} {b:>12,}{'' if a == b else '   <- differ'}")

    steps = {"ours": make_step(ours, "ours"), "torchvision": make_step(tv, "torchvision")}
    results = []
    if args.steps > 0:
        print("\n| threads | input | batch | ours median s | torchvision median s | ratio ours/tv "
              "| paired per-step ratio, quartiles |")
        print("|---|---|---|---|---|---|---|")
    for n in args.threads if args.steps > 0 else []:
        torch.set_num_threads(n)
        for size in args.sizes:
            tv.transform.min_size, tv.transform.max_size = (size,), size
            batches = make_batches(size, args.batch, args.batches, args.seed)
            times, losses = measure(steps, batches, args.warmup, args.steps, args.order)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["ours"] / med["torchvision"]
            # step k of ours against step k of torchvision, run right after it on the same batch
            paired = statistics.quantiles([a / b for a, b in zip(times["ours"], times["torchvision"])], n=4)
            results.append({"threads": n, "size": size, "batch": args.batch, "steps": args.steps,
                            "median_s": med, "ratio": ratio, "paired_ratio_quartiles": paired,
                            "times_s": times,
                            "first_last_loss": {k: (v[0], v[-1]) for k, v in losses.items()}})
            print(f"| {n} | {size}×{size} | {args.batch} | {med['ours']:.3f} | "
                  f"{med['torchvision']:.3f} | {ratio:.2f} | "
                  f"{paired[0]:.2f} / {paired[1]:.2f} / {paired[2]:.2f} |", flush=True)
    if results:
        print("\nloss (first -> last step): " + "; ".join(
            f"{r['size']}px/{r['threads']}t " + ", ".join(
                f"{k} {a:.2f}->{b:.2f}" for k, (a, b) in r["first_last_loss"].items())
            for r in results))
    if args.profile:
        torch.set_num_threads(args.threads[0])
        tv.transform.min_size, tv.transform.max_size = (args.profile,), args.profile
        profile(steps, make_batches(args.profile, args.batch, 2, args.seed + 1))
    if args.json:
        args.json.write_text(json.dumps({"commit": git_head(), "params": params, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
