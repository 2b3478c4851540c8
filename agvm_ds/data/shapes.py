"""Shape outlines and scene rendering for the embedded synthetic benchmark.

Every object is described by polygons (an outer outline and, for the ring, a hole) and its
pixels come from *pycocotools'* polygon rasterizer. Drawing the image from the same masks
that the annotations decode to means polygon ground truth and pixels agree exactly, so a
perfect detector really scores AP = 1.0 and no half-pixel convention mismatch (PIL vs COCO)
leaks into the benchmark.

A scene is fully determined by ``(seed, split, index)`` through its own numpy generator, so
images can be rendered in any order, in any process, and come out bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# Names of the shape classes, in contiguous-label order.
SHAPE_NAMES = ("circle", "square", "triangle", "star", "ring", "cross")


@dataclass
class RenderedObject:
    label: int                     # contiguous class index into SHAPE_NAMES
    visible: np.ndarray            # bool [H, W]: pixels of this object that are visible
    polygons: list | None          # COCO polygons when they describe ``visible`` exactly


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def shape_outline(label: int, diameter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and an optional hole) of a shape centred on the origin, unrotated."""
    r = diameter / 2
    name = SHAPE_NAMES[label]
    if name == "circle":
        return _regular(40, r), None
    if name == "square":
        h = r / np.sqrt(2) * 1.25  # a square's diagonal is the diameter; enlarge a little
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), None
    if name == "triangle":
        return _regular(3, r * 1.05, -np.pi / 2) + [0, r * 0.2], None
    if name == "star":
        outer = _regular(5, r * 1.1, -np.pi / 2)
        inner = _regular(5, r * 1.1 * rng.uniform(0.42, 0.55), -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2), None
    if name == "ring":
        return _regular(40, r), _regular(40, r * rng.uniform(0.45, 0.62))
    if name == "cross":
        a, w = r, r * rng.uniform(0.28, 0.4)
        pts = [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
               [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]]
        return np.array(pts, dtype=np.float64), None
    raise ValueError(f"unknown shape label {label}")


def _place(points: np.ndarray, angle: float, stretch: tuple[float, float], center) -> np.ndarray:
    """Stretch, rotate, then translate; round to 2 decimals as COCO JSON stores them."""
    pts = points * np.asarray(stretch)
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + np.asarray(center)
    return np.round(pts, 2)


def polygon_mask(polys: list[list[float]], height: int, width: int) -> np.ndarray:
    """Decode COCO polygons with pycocotools (the same decoder evaluation uses)."""
    rles = mask_utils.frPyObjects(polys, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _luma(rgb) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two-colour gradient + low-frequency blotches + thin lines and dots (clutter)."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    blot = rng.uniform(-35, 35, (4, 4, 3)).astype(np.float32)
    blot = np.stack([np.asarray(Image.fromarray(blot[..., k], mode="F").resize((w, h), Image.BILINEAR))
                     for k in range(3)], axis=-1)
    img = img + blot
    clutter = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 7))):  # thin lines, never annotated
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        length, a = rng.uniform(0.1, 0.4) * max(h, w), rng.uniform(0, 2 * np.pi)
        draw.line([x0, y0, x0 + length * np.cos(a), y0 + length * np.sin(a)],
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(2, 8))):  # small dots, well below the object sizes
        x0, y0, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 0.035 * min(h, w) + 1)
        draw.ellipse([x0 - rad, y0 - rad, x0 + rad, y0 + rad],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(clutter).astype(np.float32)


def _object_colour(rng: np.random.Generator, bg_rgb: np.ndarray) -> np.ndarray:
    """A random colour whose brightness differs clearly from the background under it."""
    for _ in range(20):
        col = rng.uniform(0, 255, 3)
        if abs(_luma(col) - _luma(bg_rgb)) > 55:
            return col
    return np.where(bg_rgb > 127, 15.0, 240.0)  # fall back to the opposite extreme


def render_scene(rng: np.random.Generator, height: int, width: int,
                 max_objects: int = 4, max_hidden: float = 0.4):
    """Render one scene; returns ``(image uint8 [H, W, 3], objects, semantic uint8 [H, W])``.

    Objects are 22–50 % of the short side, rotated, slightly stretched and coloured at
    random; a later object may overlap earlier ones, but no object ends up with more than
    ``max_hidden`` of its area hidden (a candidate that would hide more is re-placed or
    dropped), so every drawn object is annotated and recognisable. Colours contrast with
    whatever lies under the object's centre. Semantic labels are ``0`` for background and
    ``label + 1`` for the visible pixels of each shape.
    """
    img = _background(rng, height, width)
    short = min(height, width)
    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    metas: list[tuple[int, list, bool]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPE_NAMES)))
        diameter = rng.uniform(0.22, 0.5) * short
        outer, hole = shape_outline(label, diameter, rng)
        angle = rng.uniform(0, 2 * np.pi)
        stretch = (rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15))
        shading = rng.uniform(-0.25, 0.25)
        for _attempt in range(15):
            margin = 0.3 * diameter  # allows a little truncation at the border
            center = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
            poly = _place(outer, angle, stretch, center)
            mask = polygon_mask([poly.reshape(-1).tolist()], height, width)
            expected = _shoelace(poly)
            if hole is not None:
                hole_poly = _place(hole, angle, stretch, center)
                mask &= ~polygon_mask([hole_poly.reshape(-1).tolist()], height, width)
                expected -= _shoelace(hole_poly)
            if mask.sum() < 0.6 * expected:
                continue  # too much of it falls outside the image
            if all(f.sum() - (v & ~mask).sum() <= max_hidden * f.sum()
                   for f, v in zip(full_masks, visible)):
                break
        else:
            continue  # no acceptable place: drop this object
        for v in visible:
            v &= ~mask
        inside = bool((poly >= 0).all() and (poly[:, 0] <= width).all() and (poly[:, 1] <= height).all())
        metas.append((label, poly.reshape(-1).tolist(), hole is None and inside))
        full_masks.append(mask)
        visible.append(mask.copy())
        bg = img[int(np.clip(center[1], 0, height - 1)), int(np.clip(center[0], 0, width - 1))]
        col = _object_colour(rng, bg)
        xs = np.nonzero(mask)[1].astype(np.float32)
        img[mask] = np.clip(col[None] * (1 + shading * (xs / width - 0.5))[:, None], 0, 255)
    img = img + rng.normal(0, 6, img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    semantic = np.zeros((height, width), dtype=np.uint8)
    objects = []
    for (label, poly, simple), full, vis in zip(metas, full_masks, visible):
        semantic[vis] = label + 1
        exact_polygon = simple and bool((full == vis).all())
        objects.append(RenderedObject(label, vis, [poly] if exact_polygon else None))
    return image, objects, semantic
