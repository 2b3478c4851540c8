"""The large-batch study under the paper's conditions (issue 33): ``launch/study.py --grid pretrained``.

    python launch/study.py --grid pretrained --dry-run     # cells, configs checked, CPU-time estimate
    python launch/study.py --grid pretrained --select      # 1. tau/alpha on the held-out draw
    python launch/study.py --grid pretrained               # 2. the grid, then the report
    python launch/study.py --grid pretrained --full        # the GPU grid (x64, more seeds)

What changes against the default grid (``launch/study.py``), and why:

* the backbone starts from **pretrained weights** (``model.backbone_checkpoint``, made by
  ``bench/pretrain_backbone.py``), the FPN and the heads from random ones: the misalignment
  of Fig. 1 comes from a trained backbone beside fresh heads. The backbone's BatchNorm is
  ``frozen_bn`` by default (``--backbone_norm bn`` trains it): the paper's text gives no norm
  (its Appendix A.5 is not in our copy); frozen BN is the detectron2/mmdetection recipe
  for a pretrained ResNet backbone, and it removes the default grid's confound (BN saw 8
  images at 1x, 32 above; docs/large_batch.md, diagnostic 3);
* two detectors: the study's RetinaNet and the miniature Faster R-CNN (RPN + RoI heads, where
  the paper finds the misalignment largest), anchors sized for 11-32 px objects at 64 px
  (:data:`DETECTORS`);
* **linear** lr scaling at every batch (the issue: no square root above 128), warmup 2 epochs;
* an evaluation at **every epoch** (``train.eval_every`` = steps per epoch), so that the report
  has AP at fixed epochs and epochs to target;
* AGVM's tau/alpha come from ``--select``: one AGVM cell per candidate at the largest batch on
  a **held-out draw** of the generator (``data.synthetic.seed=1``: its own train and val
  images), the best final AP per detector and optimizer wins; the evaluation split is never
  looked at. The choice is recorded in ``<out>/selection.json`` and the grid refuses to run
  without it.

The sizes (images, epochs, seeds) keep the default grid, selection included, within 3 hours of
the 2-core machine; ``--dry-run`` prints the estimate from :data:`RATES` (measured, see there).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch import study

DEFAULT_BACKBONE = study.REPO / "models" / "pretrained" / "uninet_tiny_shapes.safetensors"
MAKE_BACKBONE = (".venv/bin/python bench/pretrain_backbone.py --backbone uninet_tiny "
                 "--out models/pretrained/uninet_tiny_shapes.safetensors")
NORMS = ("frozen_bn", "bn")

#: detector -> (model spec, spec overrides for 11-32 px objects at 64 px). RetinaNet: the default
#: grid's anchors. Faster R-CNN: RPN anchors 4 x stride (16-256 px over strides 4-64); checked
#: at 64 px from random init, batch 16, 3 epochs of 1024 images, AP after each epoch:
#: 4 x stride 0.014 / 0.032 / 0.039, 2 x stride 0.007 / 0.010 / 0.012 (the spec's 8 x stride
#: starts at 32 px, above most objects); RetinaNet the same run 0.009 / 0.036 / 0.052
DETECTORS = {
    "retina": ("models/retinanet_uninet_tiny.json", {"head.anchors.size_per_stride": 2.0}),
    "frcnn": ("models/faster_rcnn_uninet_tiny.json", {"rpn.anchors.size_per_stride": 4.0}),
}
#: the CPU grid is RetinaNet's: Faster R-CNN costs 5-10x RetinaNet per image on this machine,
#: and giving the largest batch a few hundred steps (below) leaves no room for it in 3 hours;
#: ``--full`` (the GPU grid) has both detectors and both optimizers
OPTIMIZERS = {"retina": ("sgd", "adamw")}
FULL_OPTIMIZERS = {"frcnn": ("sgd", "adamw"), "retina": ("sgd", "adamw")}  # slowest first

#: 1x is 4 images: at a fixed image budget the largest batch gets 1/32 of 1x's steps, and the
#: 2-core machine affords ~20k images per cell. From 16 images (the default grid's 1x), 32x was
#: batch 512 with 24 steps in 8 epochs and learned nothing (AP <= 0.035 in every seed, session
#: 13's partial run); from 4 it is batch 128 with 160 steps. The lr keeps the default grid's
#: per-16-images value and scales linearly (0.005 for SGD at 4, 0.16 at 128)
BASE_BATCH = 4
#: --full (a GPU) starts from the paper's 1x, 16 images, up to 64x = 1024, with 32768 images x
#: 16 epochs: 512 steps at 1024
FULL_BASE_BATCH = 16
MULTIPLIERS = (1, 8, 32)
FULL_MULTIPLIERS = (1, 8, 32, 64)
#: (plain seeds, AGVM seeds) per multiplier: >= 5 at the largest; three plain seeds at 1x make
#: the target (their mean); one AGVM seed at 1x, where AGVM has nothing to correct (Fig. 1's baseline)
SEEDS = {1: (3, 1), 8: (2, 2), 32: (5, 5)}
FULL_SEEDS = {1: (5, 5), 8: (5, 5), 32: (10, 10), 64: (10, 10)}

TRAIN_IMAGES = 2048       # a multiple of the largest batch (16 steps per epoch at 128); sized by --dry-run
VAL_IMAGES = 128
EPOCHS = 10
WARMUP_EPOCHS = 2
FULL_TRAIN_IMAGES, FULL_VAL_IMAGES, FULL_EPOCHS = 32768, 500, 16

#: (tau = agvm.interval, alpha = agvm.momentum) candidates for --select: the paper's default,
#: and one that acts within the 24 steps of the CPU grid's largest batch (two, for the budget)
CANDIDATES = ((10, 0.97), (2, 0.9))
HELDOUT_DATA_SEED = 1
PLAIN_INTERVAL = 2        # plain cells measure Φ every 2 steps: dense curves for Fig. 1
TARGET_FRACTION = 0.99    # target = 0.99 x the 1x plain cells' mean final AP (relative 1 %)


@dataclass(frozen=True)
class PretrainedCell:
    detector: str
    optimizer: str
    agvm: bool
    multiplier: int
    seed: int
    interval: Optional[int] = None   # set on --select's cells only (the grid reads selection.json)
    momentum: Optional[float] = None
    base: int = BASE_BATCH           # the 1x batch: FULL_BASE_BATCH in --full

    @property
    def batch(self) -> int:
        return self.base * self.multiplier

    @property
    def heldout(self) -> bool:
        return self.interval is not None

    @property
    def name(self) -> str:
        base = f"{self.detector}-{self.optimizer}-{'agvm' if self.agvm else 'plain'}-b{self.batch}-s{self.seed}"
        return base + (f"-heldout-t{self.interval}-a{self.momentum}" if self.heldout else "")

    def layout(self) -> tuple[int, int]:
        """(micro batch, gradient accumulation steps) on one rank: at least two micro-batches
        (AGVM's micro estimator needs two gradient halves), at most study.LARGE_MICRO images each."""
        micro = min(study.LARGE_MICRO, self.batch // 2)
        return micro, self.batch // micro


def grid(full: bool = False) -> list[PretrainedCell]:
    """Slowest cells first (Faster R-CNN, then small batches), as study.grid orders them."""
    mults, seeds = (FULL_MULTIPLIERS, FULL_SEEDS) if full else (MULTIPLIERS, SEEDS)
    opts = FULL_OPTIMIZERS if full else OPTIMIZERS
    base = FULL_BASE_BATCH if full else BASE_BATCH
    return [PretrainedCell(det, opt, agvm, m, s, base=base)
            for det in opts for m in mults for agvm in (False, True)
            for s in range(seeds[m][agvm]) for opt in opts[det]]


def selection_cells(full: bool = False) -> list[PretrainedCell]:
    top = (FULL_MULTIPLIERS if full else MULTIPLIERS)[-1]
    opts = FULL_OPTIMIZERS if full else OPTIMIZERS
    base = FULL_BASE_BATCH if full else BASE_BATCH
    return [PretrainedCell(det, opt, True, top, 0, tau, alpha, base=base)
            for det in opts for opt in opts[det] for tau, alpha in CANDIDATES]


def check_backbone(path: Path) -> Optional[str]:
    """The one-line refusal when the pretrained weights are missing, else None."""
    if Path(path).is_file():
        return None
    return (f"error: model.backbone_checkpoint: {path} does not exist; make it with: {MAKE_BACKBONE} "
            f"(bench/pretrain_backbone.py, issue 33 item 1)")


def _repo_relative(path: Path) -> str:
    """Inside the repository relative to it (the launcher runs there): fingerprints then do not
    depend on where the clone lives."""
    try:
        return str(Path(path).resolve().relative_to(study.REPO))
    except ValueError:
        return str(path)


def cell_config(cell: PretrainedCell, base: dict, assignments: list, backbone: Path, norm: str,
                selection: Optional[dict], full: bool = False) -> dict:
    """One cell's run file: the default grid's cell (optimizer, layout, seed, plain = clamp
    [1, 1]) with this grid's model, data, schedule and AGVM settings."""
    cfg = study.cell_config(study.Cell(cell.optimizer, cell.agvm, cell.multiplier, cell.seed), base, [])
    spec, overrides = DETECTORS[cell.detector]
    cfg["model"] = {"spec": spec, "num_classes": base["model"]["num_classes"],
                    "overrides": {**overrides, "backbone.norm": norm},
                    "backbone_checkpoint": _repo_relative(backbone)}
    synthetic = cfg["data"]["synthetic"]
    synthetic["train"], synthetic["val"] = ((FULL_TRAIN_IMAGES, FULL_VAL_IMAGES) if full
                                            else (TRAIN_IMAGES, VAL_IMAGES))
    if cell.heldout:
        synthetic["seed"] = HELDOUT_DATA_SEED
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = cell.layout()
    train = cfg["train"]
    train["epochs"], train["warmup_epochs"] = (FULL_EPOCHS if full else EPOCHS), WARMUP_EPOCHS
    train["lr_scaling"] = {"base_lr": train["lr_scaling"]["base_lr"], "base_batch": study.BASE_BATCH,
                           "sqrt_above": None}   # linear at every batch
    train.pop("grad_clip", None)
    agvm = cfg["agvm"]
    if cell.heldout:
        agvm["interval"], agvm["momentum"] = cell.interval, cell.momentum
    elif cell.agvm:
        chosen = (selection or {}).get(f"{cell.detector}/{cell.optimizer}")
        if chosen is None:
            raise SystemExit(f"error: {cell.detector}/{cell.optimizer}: no tau/alpha in the selection; "
                             f"run python launch/study.py --grid pretrained --select first")
        agvm["interval"], agvm["momentum"] = chosen["interval"], chosen["momentum"]
    else:
        agvm["interval"] = PLAIN_INTERVAL  # μ is pinned: the interval only samples Φ for Fig. 1
    for key, value in assignments:
        study.set_key(cfg, key, value)
    # after the assignments, so that --set data.synthetic.train=... keeps one evaluation per epoch
    train["eval_every"] = math.ceil(cfg["data"]["synthetic"]["train"] / cell.batch)
    _, warmup = study.schedule_steps(cfg, cell.batch)
    if warmup > 0:
        train["grad_clip"] = {"max_norm": 1.0, "start_step": 0, "end_step": study.CLIP_WARMUPS * warmup}
    return cfg


#: measured images/s of one cell on one thread by micro batch, and the fixed seconds of a cell
#: (launcher, model, engine, data loaders). RetinaNet: 2026-12-08 on this 2-core machine, idle,
#: from the difference of 0.25 and 1.25 epochs of 2048 images of one real cell per layout
#: (numbers and command in docs/large_batch_pretrained.md); evaluation is taken at the training
#: rate (it errs long: evaluation ran 1.3-1.6x faster than training in the first measurement).
#: Faster R-CNN: the first measurement (micro 8 | 32, load average 4-6); it has no micro-2 rate,
#: and only ``--full`` has its cells
RATES = {"retina": {"train": {2: 39.0, 16: 120.0, 32: 170.0}, "fixed_s": 12.0},
         "frcnn": {"train": {8: 16.4, 32: 21.4}, "eval": {8: 23.0, 32: 33.0}, "fixed_s": 25.0}}


def _rate(table: dict, micro: int) -> float:
    return table[min(table, key=lambda k: abs(k - micro))]


def cell_seconds(cell: PretrainedCell, cfg: dict) -> float:
    rate = RATES[cell.detector]
    micro = cfg["train_micro_batch_size_per_gpu"]
    steps, _ = study.schedule_steps(cfg, cell.batch)
    evals = math.ceil(steps / cfg["train"]["eval_every"])
    train_rate = _rate(rate["train"], micro)
    eval_rate = _rate(rate.get("eval", rate["train"]), micro)
    return (steps * cell.batch / train_rate
            + evals * cfg["data"]["synthetic"]["val"] / eval_rate + rate["fixed_s"])


def estimate(configs: dict, jobs: int) -> float:
    """Wall seconds of ``configs`` ({cell: run file}) on ``jobs`` slots: longest first onto
    the least-loaded slot, as the thread pool takes them in grid order."""
    slots = [0.0] * max(1, jobs)
    for cell, cfg in configs.items():
        slots[slots.index(min(slots))] += cell_seconds(cell, cfg)
    return max(slots)


def read_selection(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / "selection.json").read_text())["chosen"]
    except (OSError, ValueError, KeyError):
        return None


def write_selection(out: Path, records: dict[PretrainedCell, float]) -> dict:
    """Best final AP per detector/optimizer among the held-out candidates -> selection.json."""
    chosen, tried = {}, {}
    for cell, ap in records.items():
        key = f"{cell.detector}/{cell.optimizer}"
        tried.setdefault(key, []).append({"interval": cell.interval, "momentum": cell.momentum,
                                          "heldout_ap": ap, "cell": cell.name})
    for key, rows in tried.items():
        finite = [r for r in rows if r["heldout_ap"] is not None and math.isfinite(r["heldout_ap"])]
        if finite:
            best = max(finite, key=lambda r: r["heldout_ap"])
            chosen[key] = {"interval": best["interval"], "momentum": best["momentum"]}
    doc = {"data_seed": HELDOUT_DATA_SEED, "rule": "highest final bbox AP on the held-out draw",
           "chosen": chosen, "tried": tried}
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def configs_for(cells, base: dict, assignments, backbone: Path, norm: str, selection, full: bool) -> dict:
    """{cell: run file}. The weights' sha256 goes into each file's ``_comment`` and so into the
    cell's fingerprint: remade weights retrain the cells instead of reusing them."""
    stamp = None
    if Path(backbone).is_file():
        stamp = f"backbone weights sha256 {hashlib.sha256(Path(backbone).read_bytes()).hexdigest()}"
    configs = {}
    for c in cells:
        cfg = cell_config(c, copy.deepcopy(base), assignments, backbone, norm, selection, full)
        if stamp:
            cfg["_comment"] = [stamp]
        configs[c] = cfg
    return configs
