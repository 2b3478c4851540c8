"""The four tiny pipelines (and two timm backbones) overfit two drawn images and predict.

Images are made here (filled rectangles in class-specific colours on a noisy background),
so these tests depend on nothing but the models. "Overfits" = the summed loss falls at
least 5x within a few dozen AdamW steps; afterwards inference must find the drawn objects
and its output must convert to valid COCO results.
"""

from __future__ import annotations

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat before timm)
from agvm_ds.models import build_model
from agvm_ds.partition import param_groups, resolve_partition

SIZE = 64
CAT_IDS = [3, 7, 11]  # non-contiguous COCO ids for contiguous labels 0..2
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def make_batch(scale: float = 0.5, flipped: bool = False):
    """Two images with two rectangles each; targets in the contract's format."""
    g = torch.Generator().manual_seed(0)
    layouts = [([[6, 8, 30, 34], [34, 30, 60, 58]], [0, 2]),
               ([[30, 4, 58, 26], [4, 28, 34, 60]], [1, 0])]
    images = torch.randn(2, 3, SIZE, SIZE, generator=g) * 0.1
    targets = []
    for i, (boxes, labels) in enumerate(layouts):
        masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
        sem = torch.zeros(SIZE, SIZE, dtype=torch.int64)
        for k, ((x1, y1, x2, y2), lab) in enumerate(zip(boxes, labels)):
            images[i, :, y1:y2, x1:x2] = COLOURS[lab][:, None, None]
            masks[k, y1:y2, x1:x2] = 1
            sem[y1:y2, x1:x2] = lab + 1
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "masks": masks, "sem_seg": sem, "image_id": 100 + i,
            "orig_size": (int(SIZE / scale), int(SIZE / scale)), "image_size": (SIZE, SIZE),
            "scale_factor": scale, "flipped": flipped,
        })
    return images, targets


def overfit(model, images, targets, steps: int, lr: float = 2e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(param_groups(model, resolve_partition(model), 1e-4), lr=lr, foreach=True)
    # linear decay to 0: the last steps settle instead of bouncing on the sampled RoIs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def check_detections(preds, targets, min_iou=0.5):
    """Every drawn object is found (right class, IoU >= min_iou) among the top detections."""
    from agvm_ds.evaluation.results import to_coco_results

    for pred, t in zip(preds, targets):
        assert pred["boxes"].dtype == torch.float32 and pred["boxes"].shape[1] == 4
        assert pred["labels"].dtype == torch.int64 and len(pred["scores"]) == len(pred["labels"])
        assert (pred["scores"][:-1] >= pred["scores"][1:]).all()  # sorted by score
        s = float(t["scale_factor"])
        for box, lab in zip((t["boxes"] / s).tolist(), t["labels"].tolist()):
            top = [(b, l) for b, l in zip(pred["boxes"][:10].tolist(), pred["labels"][:10].tolist())]
            assert any(l == lab and _iou(b, box) >= min_iou for b, l in top), (box, lab, top[:4])
    results = to_coco_results(preds, [t["image_id"] for t in targets], CAT_IDS)
    assert results and {r["image_id"] for r in results} == {100, 101}
    for r in results:
        assert r["category_id"] in CAT_IDS and 0 <= r["score"] <= 1
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= SIZE / s + 1e-3
    # the best detection of image 0 is one of its objects, in xywh and original pixels
    best = max((r for r in results if r["image_id"] == 100), key=lambda r: r["score"])
    gts = [[x1 / s, y1 / s, (x2 - x1) / s, (y2 - y1) / s] for x1, y1, x2, y2 in targets[0]["boxes"].tolist()]
    as_xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    assert max(_iou(as_xyxy(best["bbox"]), as_xyxy(g)) for g in gts) > 0.5
    return results


@pytest.mark.parametrize("spec,steps", [("retinanet_uninet_tiny", 40), ("faster_rcnn_uninet_tiny", 60)])
def test_detector_overfits_and_predicts(spec, steps):
    torch.manual_seed(0)
    model = build_model(spec, num_classes=3)
    images, targets = make_batch()
    hist = overfit(model, images, targets, steps, lr=3e-3)
    assert hist[-1] * 5 <= hist[0], hist
    check_detections(model.predict(images, targets), targets)
    assert model.training  # predict() restored the mode


def test_mask_rcnn_overfits_and_predicts_rle_masks():
    from pycocotools import mask as mask_utils

    torch.manual_seed(0)
    model = build_model("mask_rcnn_uninet_tiny", num_classes=3)
    images, targets = make_batch()
    hist = overfit(model, images, targets, 80, lr=3e-3)
    assert hist[-1] * 5 <= hist[0], hist
    preds = model.predict(images, targets)
    h0 = int(SIZE / targets[0]["scale_factor"])
    assert preds[0]["masks"].dtype == torch.bool and preds[0]["masks"].shape[1:] == (h0, h0)
    results = check_detections(preds, targets)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    best = max((r for r in results if r["image_id"] == 100), key=lambda r: r["score"])
    decoded = mask_utils.decode(best["segmentation"]).astype(bool)
    gt = torch.nn.functional.interpolate(targets[0]["masks"][None].float(), size=(h0, h0))[0] > 0.5
    mask_iou = max(((torch.from_numpy(decoded) & g).sum() / (torch.from_numpy(decoded) | g).sum()).item()
                   for g in gt)
    assert mask_iou > 0.6


def test_semantic_fpn_overfits_and_predicts_label_maps():
    torch.manual_seed(0)
    model = build_model("semantic_fpn_uninet_tiny", num_classes=4)
    images, targets = make_batch()
    hist = overfit(model, images, targets, 40, lr=3e-3)
    assert hist[-1] * 5 <= hist[0], hist
    preds = model.predict(images, targets)
    h0 = int(SIZE / targets[0]["scale_factor"])
    for p, t in zip(preds, targets):
        assert set(p) == {"sem_seg"} and p["sem_seg"].dtype == torch.int64
        assert p["sem_seg"].shape == (h0, h0)
        gt = torch.nn.functional.interpolate(t["sem_seg"][None, None].float(), size=(h0, h0))[0, 0].long()
        assert (p["sem_seg"] == gt).float().mean() > 0.9
    from agvm_ds.evaluation.miou import mean_iou  # the evaluation room's metric accepts them
    stats = mean_iou([p["sem_seg"] for p in preds],
                     [torch.nn.functional.interpolate(t["sem_seg"][None, None].float(), size=(h0, h0))[0, 0].long()
                      for t in targets], num_classes=4)
    assert stats["mIoU"] > 0.5


TIMM_CASES = [
    ("retinanet_uninet_tiny", {"type": "timm", "name": "resnet18", "out_indices": [2, 3, 4]}),
    ("retinanet_uninet_tiny", {"type": "timm", "name": "swin_tiny_patch4_window7_224",
                               "out_indices": [1, 2, 3],
                                 "kwargs": {"embed_dim": 32, "depths": [1, 1, 1, 1],
                                          "num_heads": [1, 2, 4, 8], "window_size": 4}}),
]


@pytest.mark.parametrize("spec,backbone", TIMM_CASES, ids=["resnet18-retinanet", "swin-retinanet"])
def test_timm_backbones_inside_pipelines(spec, backbone):
    torch.manual_seed(0)
    model = build_model(spec, num_classes=3, overrides={"backbone": backbone})
    assert model.backbone.strides == [8, 16, 32]
    if "swin" in backbone["name"]:
        assert model.backbone.nhwc  # timm's Swin features are NHWC; the wrapper permutes them
    images, targets = make_batch()
    feats = model.backbone(images)
    assert all(f.shape[1] == c for f, c in zip(feats, model.backbone.channels))
    hist = overfit(model, images, targets, 25)
    assert hist[-1] * 3 <= hist[0], hist
    preds = model.predict(images, targets)
    assert len(preds) == 2 and all(p["boxes"].shape[1] == 4 for p in preds)


def test_predictions_map_back_to_original_and_unflip():
    """Same pixels, targets saying "flipped, half scale": boxes come back mirrored and doubled."""
    torch.manual_seed(0)
    model = build_model("mask_rcnn_uninet_tiny", num_classes=3,
                        overrides={"roi_box.score_thresh": 0.0})
    images, plain_t = make_batch(scale=1.0)
    _, flip_t = make_batch(scale=0.5, flipped=True)
    plain, flipped = model.predict(images, plain_t), model.predict(images, flip_t)
    for p, f in zip(plain, flipped):
        assert len(p["boxes"]) > 0
        x1, y1, x2, y2 = p["boxes"].unbind(1)
        expected = torch.stack([SIZE - x2, y1, SIZE - x1, y2], dim=1) * 2
        torch.testing.assert_close(f["boxes"], expected, rtol=0, atol=1e-4)
        assert f["masks"].shape[1:] == (2 * SIZE, 2 * SIZE)
        # the mask pasted into the mirrored box is the mirrored mask (up to resampling)
        mirrored = torch.flip(torch.nn.functional.interpolate(
            p["masks"][:, None].float(), scale_factor=2.0)[:, 0] > 0.5, dims=[-1])
        agree = (mirrored == f["masks"]).float().mean()
        assert agree > 0.97


@pytest.mark.parametrize("spec", ["mask_rcnn_uninet_tiny", "retinanet_uninet_tiny"])
def test_bf16_weights_train_and_predict_in_fp32_box_space(spec):
    """DeepSpeed's bf16 mode casts the module: losses stay finite, outputs stay fp32."""
    torch.manual_seed(0)
    model = build_model(spec, num_classes=3).to(torch.bfloat16)
    images, targets = make_batch()
    losses = model(images.to(torch.bfloat16), targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    preds = model.predict(images.to(torch.bfloat16))  # no targets: padded-image coordinates
    assert preds[0]["boxes"].dtype == torch.float32 and preds[0]["scores"].dtype == torch.float32
    assert preds[0]["boxes"].numel() == 0 or preds[0]["boxes"].max() <= SIZE


@pytest.mark.parametrize("spec", ["retinanet_uninet_tiny", "mask_rcnn_uninet_tiny"])
def test_image_without_objects(spec):
    """An image with no annotations gives finite losses and gradients everywhere."""
    torch.manual_seed(0)
    model = build_model(spec, num_classes=3)
    images, targets = make_batch()
    targets[1] = dict(targets[1], boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                      masks=torch.zeros(0, SIZE, SIZE, dtype=torch.uint8))
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_box_head_inference_with_an_image_that_has_no_proposal():
    """An RPN may keep no proposal for an image (seen at batch 512 in the pretrained study: a
    reshape of zero rows with -1 crashed evaluation). That image gets no detection; the other
    image of the batch gets exactly what it gets alone."""
    torch.manual_seed(0)
    model = build_model("faster_rcnn_uninet_tiny", num_classes=3,  # keep every class of every proposal
                        overrides={"roi_box.score_thresh": 0.0}).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.extract(images)
        proposals = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 8.0, 50.0, 60.0]]), torch.zeros(0, 4)]
        sizes = [(64, 64), (64, 64)]
        both = model.roi_box.inference(feats, proposals, sizes)
        first = model.roi_box.inference([f[:1] for f in feats], proposals[:1], sizes[:1])
    assert both[1]["boxes"].shape == (0, 4) and len(both[1]["scores"]) == len(both[1]["labels"]) == 0
    assert len(first[0]["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(both[0][key].float(), first[0][key].float(), atol=1e-5), key
