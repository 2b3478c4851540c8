#!/usr/bin/env python
"""Your own training loop: torchvision's Faster R-CNN trained with AGVM inside DeepSpeed.

    deepspeed --num_gpus 2 examples/torchvision_detector.py [--data DIR] [--steps 200] [--zero 2|3]
    torchrun --nproc_per_node 2 examples/torchvision_detector.py ...          # the same job

What agvm-ds adds to a plain DeepSpeed loop is one call, ``agvm_ds.initialize`` in place of
``deepspeed.initialize``: the AGVM module partition (backbone / fpn / rpn / roi_box) is inferred
from torchvision's structure (no ``modules=``), the ``optimizer`` section names AGVM's base
optimizer, μ per module is read with ``agvm_ds.modulation(engine)`` and travels in
``engine.save_checkpoint`` / ``load_checkpoint``. Everything else is ordinary torchvision and
DeepSpeed: a COCO-format folder read with pycocotools, a DistributedSampler, ``engine(images,
targets)`` returning torchvision's loss dict, COCO evaluation at the end.

``--data DIR`` is a COCO-layout folder (``DIR/annotations/instances_{train,val}.json`` and the
images under ``DIR/{train,val}/``); by default the embedded shapes benchmark is generated into
``.cache/data``. Outputs in ``--out`` (default ``runs/torchvision_detector``): ``metrics.jsonl``
(loss and μ per module), ``checkpoints/step_<N>/`` and ``eval.json``. ``--resume`` continues
from the newest checkpoint there, μ included.
"""

from __future__ import annotations

import agvm_ds  # first: on CPU-only torch it makes torchvision importable and lends it NMS/RoIAlign

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models import detection

REPO = Path(__file__).resolve().parents[1]


class CocoDetection(torch.utils.data.Dataset):
    """``(image [3, H, W] in [0, 1], {"boxes" xyxy, "labels" 1..K, "image_id"})`` per image."""

    def __init__(self, root: Path, split: str):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            self.coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        self.folder = root / split
        self.ids = sorted(self.coco.getImgIds())
        self.category_of = dict(enumerate(sorted(self.coco.getCatIds()), start=1))  # label -> category id
        self.label_of = {c: label for label, c in self.category_of.items()}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image_id = self.ids[i]
        info = self.coco.loadImgs(image_id)[0]
        image = np.asarray(Image.open(self.folder / info["file_name"]).convert("RGB"), dtype=np.float32) / 255
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
                if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), {"boxes": boxes, "labels": labels,
                                                                       "image_id": image_id}


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def ds_config(args) -> dict:
    """DeepSpeed's sections plus ``agvm``; ``optimizer`` is AGVM's base optimizer."""
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                     "warmup_num_steps": args.warmup}},
        "zero_optimization": {"stage": args.zero},
        "gradient_clipping": 10.0,
        # μ per module every `interval` steps from the end of warmup, smoothed with `momentum`
        "agvm": {"interval": args.interval, "start_step": args.warmup, "momentum": 0.9},
        "steps_per_print": 10**9,
    }


def evaluate(engine, dataset, args, rank, world) -> dict | None:
    """Every rank predicts an equal share of the val images (ZeRO-3 gathers weights
    collectively, so all ranks run the same number of forwards); rank 0 scores them."""
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler, collate_fn=collate)
    engine.eval()
    results = []
    with torch.no_grad():
        for images, targets in loader:
            for out, target in zip(engine(images), targets):
                for (x1, y1, x2, y2), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                          out["labels"].tolist()):
                    results.append({"image_id": target["image_id"], "category_id": dataset.category_of[label],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    engine.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank != 0:
        return None
    unique = {(r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"]): r for part in gathered for r in part}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(list(unique.values())) if unique else COCO(), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    names = ["bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"]
    return {n: float(v) for n, v in zip(names, evaluator.stats)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="COCO-layout folder (default: the embedded benchmark)")
    p.add_argument("--train_images", type=int, default=2000, help="embedded benchmark only")
    p.add_argument("--val_images", type=int, default=200, help="embedded benchmark only")
    p.add_argument("--size", type=int, default=128, help="image size (the model resizes to it)")
    p.add_argument("--backbone", choices=("mobilenet", "resnet50"), default="mobilenet")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4, help="images per rank and step")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--interval", type=int, default=5, help="AGVM's tau")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--checkpoint_every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/torchvision_detector"))
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()

    import deepspeed

    if deepspeed.get_accelerator().device_name() == "cpu":
        from agvm_ds.process_group import skip_shm_comm_build

        skip_shm_comm_build()  # a 36 s JIT build DeepSpeed needs only for inference all-reduces
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank

    root = args.data
    if root is None:
        from agvm_ds.data.synthetic import ensure_synthetic

        root = ensure_synthetic(REPO / ".cache" / "data", train=args.train_images, val=args.val_images,
                                size=args.size)
    train_set, val_set = CocoDetection(root, "train"), CocoDetection(root, "val")
    build = {"mobilenet": detection.fasterrcnn_mobilenet_v3_large_fpn,
             "resnet50": detection.fasterrcnn_resnet50_fpn}[args.backbone]
    model = build(weights=None, weights_backbone=None, num_classes=len(train_set.category_of) + 1,
                  min_size=args.size, max_size=args.size)
    if rank == 0:
        inferred = agvm_ds.infer_partition(model)
        print(f"[example] AGVM modules ({inferred.layout}): {', '.join(inferred.modules)}", flush=True)

    sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, sampler=sampler,
                                         collate_fn=collate, drop_last=True)
    engine, _, _, _ = agvm_ds.initialize(model=model, config=ds_config(args))

    step = 0
    checkpoints = args.out / "checkpoints"
    if args.resume and (checkpoints / "latest").exists():
        _, client = engine.load_checkpoint(str(checkpoints))  # weights, optimizer, ZeRO partitions and μ
        step = int(client["step"])
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "metrics.jsonl", "a") if rank == 0 else None
    while step < args.steps:
        epoch, done = divmod(step, len(loader))
        sampler.set_epoch(epoch)  # the same shuffle on every rank, a new one per epoch
        for images, targets in itertools.islice(loader, done, None):  # a resumed epoch skips what it saw
            losses = engine(images, targets)  # torchvision's loss dict in training mode
            loss = sum(losses.values())
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves it in engine.step)
            engine.backward(loss)
            engine.step()
            step += 1
            agvm = agvm_ds.modulation(engine)  # the last AGVM update: cos, Φ and μ per module
            if rank == 0:
                mu = {m: round(s["mu"], 4) for m, s in agvm["modules"].items()}
                record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                          "lr": lr, "agvm_step": agvm["step"], "mu": mu}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if step % 10 == 0 or step == args.steps:
                    print(f"[example] step {step} loss {record['loss']:.3f} mu {mu}", flush=True)
            if step % args.checkpoint_every == 0 or step == args.steps:
                engine.save_checkpoint(str(checkpoints), tag=f"step_{step}", client_state={"step": step})
            if step == args.steps:
                break
    stats = evaluate(engine, val_set, args, rank, world)
    if rank == 0:
        stats["step"] = step
        (args.out / "eval.json").write_text(json.dumps(stats, indent=2))
        print(f"[example] bbox_AP {stats['bbox_AP']:.3f} (AP50 {stats['bbox_AP50']:.3f}) on {len(val_set)} "
              f"val images; outputs in {args.out}", flush=True)
        log.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
