"""Rank-side code for tests/test_torchvision_detectors.py (module-level so spawned ranks import it).

torchvision's own detectors (``weights=None``, 64-px images, few RoIs: cheap on CPU) go
through ``agvm_ds.initialize`` with no ``modules=``: the partition is inferred from their
structure. Where a case asks for it, every rank records its own gradient of every
micro-batch through tensor hooks (what autograd hands the parameter, before DeepSpeed or
AGVM touch it) and the brute-force reference is built from those: the two halves G1, G2 of
the estimator's definition (tests/reference.py ``halves``) as full float64 vectors, summed
over ranks with a plain all-reduce, and cos per module from them — no AGVM code involved.
The module each parameter belongs to comes from tests/precision_cases.py ``owner_of`` (the
prefix rule written independently) applied to the inferred prefixes.
"""

from __future__ import annotations

import math

import torch

from precision_cases import GradRecorder, owner_of
from reference import halves

IMAGES, SIZE = 2, 64
RCNN_SMALL = dict(num_classes=3, min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=200,
                  rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)


def build(name: str):
    """The detector ``name``, seeded (identical weights on every rank)."""
    from torchvision.models import detection as det
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(0)
    none = dict(weights=None, weights_backbone=None)
    if name == "fasterrcnn_mobilenet":
        return det.fasterrcnn_mobilenet_v3_large_fpn(**none, **RCNN_SMALL)
    if name == "fasterrcnn_mobilenet_small":  # torchvision's box head at 64 wide, not 1024
        model = det.fasterrcnn_mobilenet_v3_large_fpn(**none, **RCNN_SMALL)
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 64)
        model.roi_heads.box_predictor = FastRCNNPredictor(64, 3)
        return model
    if name == "fasterrcnn_r50":
        return det.fasterrcnn_resnet50_fpn(**none, **RCNN_SMALL)
    if name == "maskrcnn_r50":
        return det.maskrcnn_resnet50_fpn(**none, **RCNN_SMALL)
    if name == "retinanet_r50":
        return det.retinanet_resnet50_fpn(**none, num_classes=3, min_size=SIZE, max_size=SIZE)
    if name == "retinanet_mobilenet":  # torchvision's RetinaNet on its MobileNetV3-FPN backbone
        backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6)
        anchors = det.anchor_utils.AnchorGenerator(((16, 24), (32, 48), (64, 96)), ((0.5, 1.0, 2.0),) * 3)
        return det.RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)
    raise ValueError(name)


def batch(step: int, rank: int, micro: int):
    """``IMAGES`` random images, one or two boxes each (with box-shaped masks)."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    images, targets = [], []
    for _ in range(IMAGES):
        images.append(torch.rand(3, SIZE, SIZE, generator=g))
        n = int(torch.randint(1, 3, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * (SIZE - 24)
        wh = 16 + torch.rand(n, 2, generator=g) * 8
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (n,), generator=g), "masks": masks})
    return images, targets


def config(stage: int, gas: int, estimator: str, extra: dict | None = None) -> dict:
    return {"train_micro_batch_size_per_gpu": IMAGES, "gradient_accumulation_steps": gas,
            "train_batch_size": IMAGES * gas * 2, "gradient_clipping": 0.0,
            "optimizer": {"type": "SGD", "params": {"lr": 0.002, "momentum": 0.9, "weight_decay": 1e-4}},
            "zero_optimization": {"stage": stage},
            "agvm": {"interval": 1, "start_step": 0, "momentum": 0.5, "estimator": estimator},
            "steps_per_print": 10**9, **(extra or {})}


def _reference_cos(rec: GradRecorder, step: int, rank: int, world: int, gas: int, estimator: str, owner: dict):
    """cos(G1, G2) per module in float64 from every rank's recorded micro-batch gradients."""
    import torch.distributed as dist

    h1, h2 = halves(world, gas, estimator)
    micro = rec.by_step.pop(step)
    cos = {}
    for m in dict.fromkeys(owner.values()):
        names = [n for n in rec.names if owner[n] == m]
        half = []
        for members in (h1, h2):
            local = [micro[k] for r, k in members if r == rank]
            v = torch.zeros(sum(rec.numel[n] for n in names), dtype=torch.float64)
            for grads in local:
                v += torch.cat([grads[n] for n in names])
            dist.all_reduce(v)  # plain sum over ranks: each half is whole on every rank
            half.append(v)
        cos[m] = float(half[0] @ half[1] / (half[0].norm() * half[1].norm()))
    return cos


def run(rank, world, name, stage, steps=1, gas=2, estimator="micro", check=False, extra=None):
    import time

    import agvm_ds

    start = time.perf_counter()
    model = build(name)
    inferred = agvm_ds.infer_partition(model)
    built = time.perf_counter()
    engine, *_ = agvm_ds.initialize(model=model, config=config(stage, gas, estimator, extra))
    ready = time.perf_counter()
    owner = owner_of([n for n, p in engine.module.named_parameters() if p.requires_grad], inferred.modules)
    rec = GradRecorder(list(engine.module.named_parameters()), keep=lambda t: True) if check else None
    losses, reports, reference = [], [], []
    for t in range(steps):
        for k in range(gas):
            images, targets = batch(t, rank, k)
            loss = sum(engine(images, targets).values())
            engine.backward(loss)
            if rec is not None:
                rec.end_micro(t)
            engine.step()
            losses.append(float(loss.detach()))
        rep = agvm_ds.modulation(engine)
        reports.append({"step": rep["step"], "modules": rep["modules"], "mu": rep["mu"], "skipped": rep["skipped"]})
        if rec is not None:
            reference.append(_reference_cos(rec, t, rank, world, gas, estimator, owner))
    if rec is not None:
        rec.remove()
    out = {"name": name, "stage": stage, "layout": inferred.layout, "order": list(engine.agvm.modulator.modules),
           "losses": losses, "reports": reports, "reference": reference,
           "finite": all(math.isfinite(v) for v in losses), "estimator": engine.agvm.estimator.name,
           "subnormals_flushed": float(torch.tensor([1e-39]) * 1.0) == 0.0,  # initialize's CPU default
           "weight_decays": sorted({g.get("weight_decay") for g in engine.optimizer.optimizer.param_groups}),
           "seconds": {"build": built - start, "initialize": ready - built, "steps": time.perf_counter() - ready}}
    engine.destroy()
    return out


def run_many(rank, world, cases):
    return [run(rank, world, **case) for case in cases]
