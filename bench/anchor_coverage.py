#!/usr/bin/env python
"""How a RetinaNet spec's anchors cover a COCO dataset's boxes, level by level.

    .venv/bin/python bench/anchor_coverage.py --ann .cache/data/shapes-v1-px128-train2000-val200-seed0/annotations/instances_train.json \
        --size 128 --size_per_stride 4 3

For each anchor size (``head.anchors.size_per_stride``) of ``--spec`` it counts, over every
annotated box: the anchors at IoU >= ``fg_iou`` per level (what the matcher makes foreground,
besides low-quality matches), the boxes that no anchor reaches at ``fg_iou`` (trained only
through their single best anchor), and the level holding each box's best anchor. Anchors
are laid on a ``--size`` x ``--size`` image, as the quickstart's fixed-size inputs are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from agvm_ds.config.spec import load_spec
    from agvm_ds.models.build import build_model
    from agvm_ds.ops import box_iou

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--spec", default="models/retinanet_uninet_tiny.json")
    p.add_argument("--size", type=int, default=128, help="input side (px)")
    p.add_argument("--size_per_stride", type=float, nargs="+", default=[4.0, 3.0])
    args = p.parse_args(argv)
    coco = json.loads(Path(args.ann).read_text())
    xywh = torch.tensor([a["bbox"] for a in coco["annotations"]], dtype=torch.float64)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    sides = xywh[:, 2:]
    print(f"{len(boxes)} boxes; short side {sides.min(1).values.min():.0f}-{sides.min(1).values.max():.0f} px, "
          f"long side {sides.max(1).values.min():.0f}-{sides.max(1).values.max():.0f} px")
    for sps in args.size_per_stride:
        spec = load_spec(args.spec, {"head.anchors.size_per_stride": sps})
        model = build_model(spec).eval()
        head = model.head
        with torch.no_grad():
            feats = model.neck(model.backbone(torch.zeros(1, 3, args.size, args.size)))
        per_level = [a.to(torch.float64) for a in head.anchors(feats)]
        level = torch.cat([torch.full((len(a),), i) for i, a in enumerate(per_level)])
        m = box_iou(boxes, torch.cat(per_level))
        fg = m >= spec.head.fg_iou
        sizes = [f"{min((a[:, 2] - a[:, 0]).min().item(), (a[:, 3] - a[:, 1]).min().item()):.0f}-"
                 f"{max((a[:, 2] - a[:, 0]).max().item(), (a[:, 3] - a[:, 1]).max().item()):.0f}" for a in per_level]
        best = Counter(level[m.argmax(1)].tolist())
        print(f"size_per_stride {sps}: anchor sides per level {sizes} px; "
              f"anchors at IoU >= {spec.head.fg_iou} per level "
              f"{[int(fg[:, level == i].sum()) for i in range(len(per_level))]}; "
              f"boxes without one {int((~fg.any(1)).sum())}; "
              f"best anchor's level (boxes) {[best.get(i, 0) for i in range(len(per_level))]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
