"""The torchvision adapter (issue 32 item 1, ``models/detectors/torchvision_adapter.py``).

Reference, independent of the code under test: torchvision's own model called on the
unnormalized image with its own transform. The adapter must give the same detections,
mapped back to the original image here by a naive per-box loop, and the same inferred
partition as the unwrapped model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import agvm_ds  # noqa: F401  (torchvision's ops on this torch)
from agvm_ds.errors import ConfigError


def _pipeline_batch():
    """Two photographs of different sizes through the package's own transform (the second
    flipped) and collate."""
    from agvm_ds.data.transforms import Transform, collate

    g = torch.Generator().manual_seed(3)
    items = []
    for k, (h, w) in enumerate([(80, 100), (128, 96)]):  # both resize to a short side of 64
        transform = Transform(min_size=64, max_size=1000, flip_prob=float(k))
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 70.0, 60.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        items.append(transform(Image.fromarray(pixels), {"image_id": k, "boxes": boxes.numpy(), "masks": masks.numpy(),
                                                        "labels": torch.tensor([0, 2]).numpy()}))
    return collate(items, 32)


def _reference_detections(model, images, targets):
    """torchvision's own model on the unnormalized resized images (its transform normalizes
    with the pipeline's mean/std; a short side of 64 is already its min_size, so it does not
    resize), then mapped to the original image by a naive per-box loop."""
    from agvm_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model.transform.image_mean, model.transform.image_std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    model.transform.min_size, model.transform.max_size = (64,), 1000
    raw = [images[i, :, :h, :w] * std + mean for i, (h, w) in enumerate(t["image_size"] for t in targets)]
    model.eval()
    with torch.no_grad():
        dets = model(raw)
    out = []
    for det, t in zip(dets, targets):
        (h, w), (h0, w0), s = t["image_size"], t["orig_size"], t["scale_factor"]
        boxes = []
        for x1, y1, x2, y2 in det["boxes"].tolist():
            x1, x2, y1, y2 = min(max(x1, 0), w), min(max(x2, 0), w), min(max(y1, 0), h), min(max(y2, 0), h)
            if t["flipped"]:
                x1, x2 = w - x2, w - x1
            boxes.append([min(x1 / s, w0), min(y1 / s, h0), min(x2 / s, w0), min(y2 / s, h0)])
        out.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": det["scores"], "labels": det["labels"],
                    "masks": det.get("masks")})
    return out, raw


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_rcnn():
    from torchvision.models import detection

    torch.manual_seed(0)
    return detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                       box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                                                       rpn_post_nms_top_n_test=30, box_detections_per_img=20)


def _tiny_mask_rcnn(tiny_rcnn):
    from torchvision.models.detection import MaskRCNN

    torch.manual_seed(0)
    return MaskRCNN(copy.deepcopy(tiny_rcnn.backbone), num_classes=4, min_size=64, max_size=1000,
                    rpn_anchor_generator=copy.deepcopy(tiny_rcnn.rpn.anchor_generator),
                    box_score_thresh=0.0, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                    box_detections_per_img=10)


def _naive_original_probs(prob, target) -> torch.Tensor:
    """A resized-image mask probability map -> the original image's, pixel by pixel: each
    original pixel centre takes its nearest resized pixel (un-flipped)."""
    (h, w), (h0, w0) = target["image_size"], target["orig_size"]
    rows = [min(h - 1, int((y0 + 0.5) * h / h0)) for y0 in range(h0)]
    cols = [min(w - 1, int((x0 + 0.5) * w / w0)) for x0 in range(w0)]
    if target["flipped"]:
        cols = [w - 1 - x for x in cols]
    return prob[rows][:, cols]


@pytest.mark.parametrize("kind", ["fcos", "faster_rcnn", "mask_rcnn"])
def test_adapter_predicts_what_torchvision_predicts_on_the_unnormalized_image(kind, tiny_rcnn):
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector
    from model_family_user import build_fcos

    torch.manual_seed(0)
    tv = {"fcos": lambda: build_fcos(3, score_thresh=0.0), "faster_rcnn": lambda: copy.deepcopy(tiny_rcnn),
          "mask_rcnn": lambda: _tiny_mask_rcnn(tiny_rcnn)}[kind]()
    if kind == "fcos":
        tv.topk_candidates, tv.detections_per_img = 50, 20
    reference = copy.deepcopy(tv)
    images, targets = _pipeline_batch()
    assert [t["flipped"] for t in targets] == [False, True] and targets[0]["scale_factor"] != 1.0
    adapter = TorchvisionDetector(tv, num_classes=3)
    assert adapter.offset == (0 if kind == "fcos" else 1)  # R-CNN: label 0 is background
    ref, raw = _reference_detections(reference, images, targets)
    if kind == "mask_rcnn":  # random mask logits sit near 0.5: cut them at their median instead
        adapter.mask_threshold = float(ref[0]["masks"][ref[0]["masks"] > 0].median())
    ours = adapter.predict(images, targets)
    for a, b in zip(ours, ref):
        assert len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"] - adapter.offset) and int(a["labels"].min()) >= 0
    if kind == "mask_rcnn":  # masks in original pixels: the naive per-pixel map of torchvision's
        for a, b, t in zip(ours, ref, targets):
            assert a["masks"].dtype == torch.bool and a["masks"].shape[1:] == t["orig_size"]
            for k in range(0, len(a["masks"]), 3):
                naive = _naive_original_probs(b["masks"][k, 0], t)
                # nearest and bilinear sampling differ only where the probability is close
                # to the threshold: compare the pixels clear of it (most of them)
                clear = (naive - adapter.mask_threshold).abs() > 0.05
                agree = (a["masks"][k] == (naive > adapter.mask_threshold))[clear].float().mean()
                assert float(clear.float().mean()) > 0.3 and float(agree) > 0.99, (k, float(agree))
            assert any(m.any() for m in a["masks"])
    # training: the same losses as torchvision on the unnormalized images, labels shifted for
    # R-CNN (torchvision's training-time resize is skipped: it would draw a random size first)
    adapter.train()
    reference.train()
    reference.transform._skip_resize = True
    torch.manual_seed(1)
    losses = adapter(images, targets)
    torch.manual_seed(1)
    expected = reference(raw, [{"boxes": t["boxes"], "labels": t["labels"] + adapter.offset, "masks": t["masks"]}
                               for t in targets])
    assert losses.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-4, atol=1e-5)


def test_adapter_partition_is_torchvisions_inferred_one_under_the_wrapper(tiny_rcnn):
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector
    from agvm_ds.partition import infer_partition, resolve_partition

    tv = copy.deepcopy(tiny_rcnn)
    inferred = infer_partition(tv)
    adapter = TorchvisionDetector(tv, num_classes=3)
    assert list(adapter.agvm_modules) == list(inferred.modules) == ["backbone", "fpn", "rpn", "roi_box"]
    assert all(p == "detector." + q for m in inferred.modules
               for p, q in zip(adapter.agvm_modules[m], inferred.modules[m]))
    partition = resolve_partition(adapter)  # every trainable parameter owned once
    assert len(partition.owner) == sum(p.requires_grad for p in adapter.parameters())
    with pytest.raises(ConfigError, match=r"scores 4 classes, the dataset needs 5 \+ 1"):
        TorchvisionDetector(copy.deepcopy(tiny_rcnn), num_classes=5)
