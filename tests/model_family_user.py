"""A user's model builder for tests/test_model_families.py (``"model_family_user:build"``).

Importing this module leaves a trace in ``AGVM_DS_TEST_IMPORT_TRACE`` (when set), so a test
can tell whether a read-only config check imported user code.
"""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("AGVM_DS_TEST_IMPORT_TRACE"):
    Path(os.environ["AGVM_DS_TEST_IMPORT_TRACE"]).write_text("imported")


def build(num_classes: int, spec: str = "retinanet_uninet_tiny"):
    """A network that follows the package contract but declares no AGVM partition: the
    launcher infers it from the attribute names (backbone / neck / head)."""
    from agvm_ds.models import build_model

    model = build_model(spec, num_classes=num_classes)
    del model.agvm_modules, model.agvm_anchor
    return model


def build_fcos(num_classes: int, score_thresh: float = 0.2):
    """A torchvision FCOS on a ResNet-18 FPN (no weights): the launcher wraps it."""
    import agvm_ds  # noqa: F401  (torchvision's ops on this torch)
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
                                   norm_layer=None)
    return FCOS(backbone, num_classes, score_thresh=score_thresh, min_size=64, max_size=64)
