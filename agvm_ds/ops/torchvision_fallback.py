"""torchvision's detection ops on agvm-ds's pure-torch kernels where its compiled ones are missing.

Where torchvision's extension does not load (CPU-only torch with the registry's CUDA build of
torchvision: :mod:`agvm_ds._compat`), ``torchvision.ops.nms`` and everything built on it
(``batched_nms``, so every torchvision detector's RPN and post-processing) raise, and
``roi_align`` falls back to torchvision's slow eager transcription. :func:`install` then points
torchvision's ``nms`` / ``batched_nms`` / ``roi_align`` — at every place torchvision's own
code looks them up (``torchvision.ops``, ``ops.boxes``, ``ops.roi_align``, ``ops.poolers`` for
``MultiScaleRoIAlign``, ``models.detection.roi_heads`` for mask targets) — at
:func:`agvm_ds.ops.nms` / :func:`~agvm_ds.ops.batched_nms` / :func:`~agvm_ds.ops.roi_align`
(same arguments, same semantics; tested against torchvision's own definitions in
tests/test_ops_boxes_nms.py, tests/test_ops_roi_align.py and tests/test_torchvision_fallback.py).

It never acts where the compiled extension loaded (``torchvision.extension._has_ops()``):
working kernels, CUDA or CPU, stay torchvision's. ``import agvm_ds`` runs it at once when
torchvision is already imported, else right after torchvision's first import (a one-shot
import hook, :func:`agvm_ds._compat.after_torchvision_import`). On CPU-only torch
``import torchvision`` *before* ``import agvm_ds`` fails inside torchvision itself, so there
the documented order is: ``import agvm_ds`` first.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("agvm_ds.ops")

__all__ = ["install", "installed", "ORIGINALS"]

#: (module name, attribute) -> torchvision's own object, as found before install() replaced it
ORIGINALS: dict[tuple[str, str], object] = {}

# where torchvision's code looks each op up (module globals bound at its import time)
_SITES = {
    "nms": ("torchvision.ops", "torchvision.ops.boxes"),
    "batched_nms": ("torchvision.ops", "torchvision.ops.boxes"),
    "roi_align": ("torchvision.ops", "torchvision.ops.roi_align", "torchvision.ops.poolers",
                  "torchvision.models.detection.roi_heads"),
}


def _nms(boxes, scores, iou_threshold: float):
    from agvm_ds.ops.nms import nms

    return nms(boxes, scores, float(iou_threshold))


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    from agvm_ds.ops.nms import batched_nms

    return batched_nms(boxes, scores, idxs, float(iou_threshold))


def _roi_align(input, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
               aligned: bool = False):
    from agvm_ds.ops.roi_align import roi_align

    return roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


_REPLACEMENTS = {"nms": _nms, "batched_nms": _batched_nms, "roi_align": _roi_align}
for _fn in _REPLACEMENTS.values():
    _fn._agvm_ds_fallback = True  # how tests and a second install() recognise them


def installed() -> bool:
    """Whether torchvision's ops currently point at agvm-ds's kernels."""
    ops = sys.modules.get("torchvision.ops")
    return bool(ops is not None and getattr(getattr(ops, "nms", None), "_agvm_ds_fallback", False))


def install() -> bool:
    """Point torchvision's nms / batched_nms / roi_align at agvm-ds's kernels if (and only if)
    torchvision is imported and its compiled extension did not load; True when it acted."""
    if "torchvision.ops" not in sys.modules:
        return False
    from torchvision.extension import _has_ops

    if _has_ops():
        return False
    for op, sites in _SITES.items():
        for site in sites:
            module = sys.modules.get(site)
            if module is None or not hasattr(module, op):
                continue
            current = getattr(module, op)
            if getattr(current, "_agvm_ds_fallback", False):
                continue
            ORIGINALS[(site, op)] = current
            setattr(module, op, _REPLACEMENTS[op])
    log.info("agvm_ds.ops: torchvision's compiled ops did not load: torchvision.ops nms, batched_nms, "
             "roi_align (and MultiScaleRoIAlign) run on agvm-ds's pure-torch kernels")
    return True
