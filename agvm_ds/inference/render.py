"""Draw predictions onto their image with PIL: boxes with class name and score, instance
masks translucent, semantic label maps coloured over
the image (except a class 0 named ``background``)."""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

MASK_ALPHA = 0.45
SEMANTIC_ALPHA = 0.5


def class_colour(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class index (golden-ratio hues)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def render(image: Image.Image, pred: dict, class_names: Sequence[str]) -> Image.Image:
    """A new RGB image: ``image`` with ``pred`` (one result of ``model.predict``) drawn on it."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32)
    if "sem_seg" in pred:
        labels = _numpy(pred["sem_seg"]).astype(np.int64)
        palette = np.array([class_colour(k) for k in range(max(len(class_names), int(labels.max()) + 1))],
                           dtype=np.float32)
        alpha = np.full(labels.shape + (1,), SEMANTIC_ALPHA, dtype=np.float32)
        if class_names and class_names[0] == "background":
            alpha[labels == 0] = 0.0  # the image itself shows through where nothing was found
        canvas = (1 - alpha) * canvas + alpha * palette[labels]
        return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    labels = _numpy(pred.get("labels", [])).astype(np.int64).reshape(-1)
    if pred.get("masks") is not None:
        masks = _numpy(pred["masks"]).astype(bool)
        masks = masks[:, 0] if masks.ndim == 4 else masks
        for mask, label in zip(masks, labels):
            colour = np.array(class_colour(int(label)), dtype=np.float32)
            canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * colour
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    boxes = _numpy(pred.get("boxes", np.zeros((0, 4)))).reshape(-1, 4)
    scores = _numpy(pred.get("scores", np.zeros(len(boxes)))).reshape(-1)
    for box, label, score in zip(boxes, labels, scores):
        colour = class_colour(int(label))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        text = f"{name} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return out
