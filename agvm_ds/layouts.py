"""Module layouts of detectors agvm-ds did not write: the data :func:`agvm_ds.partition.infer_partition` tries.

A model built by agvm-ds declares its AGVM partition (``agvm_modules``). A torchvision,
mmdetection-, detectron2- or DETR-style model does not, but its attribute names say which
parts are the backbone, the neck and the heads. Each :class:`Layout` below is one such
naming scheme: the submodules that must exist for it to apply (``requires``), then the AGVM
modules it cuts, each a list of submodule paths. Paths may nest — the longest prefix wins
(:func:`agvm_ds.partition.classify_parameters`) — so a module may name a parent as a
catch-all (detectron2's FPN is ``backbone`` around ``backbone.bottom_up``; everything under
``roi_heads`` that is not the mask head is the box head).

Layouts are tried in order; the first whose ``requires`` exist *and* whose modules cover
every trainable parameter wins (modules that hold no trainable parameter, e.g. a Faster
R-CNN's absent mask head, are dropped). When none fits, the generic fallback cuts the
model's top-level children that hold trainable parameters (anchor ``backbone`` when there
is one) and says so. Pure data and a lookup: nothing here imports the rest of the package.
"""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["Layout", "LAYOUTS", "GENERIC", "has_path"]

GENERIC = "generic"  # the name of the fallback: top-level children with trainable parameters


@dataclasses.dataclass(frozen=True)
class Layout:
    """One attribute-naming scheme: ``modules`` is ``((module, (path, ...)), ...)``, anchor first."""

    name: str
    requires: tuple[str, ...]
    modules: tuple[tuple[str, tuple[str, ...]], ...]
    anchor: str = "backbone"


_RCNN_TV = Layout(
    "torchvision R-CNN (FasterRCNN / MaskRCNN / KeypointRCNN)",
    requires=("backbone.body", "rpn", "roi_heads"),
    modules=(("backbone", ("backbone.body",)),
             ("fpn", ("backbone",)),  # backbone.fpn, and whatever else wraps the body
             ("rpn", ("rpn",)),
             ("roi_box", ("roi_heads",)),  # box_head + box_predictor
             ("roi_mask", ("roi_heads.mask_head", "roi_heads.mask_predictor")),
             ("roi_keypoint", ("roi_heads.keypoint_head", "roi_heads.keypoint_predictor"))))

_ONE_STAGE_TV = Layout(
    "torchvision one-stage (RetinaNet / FCOS)",
    requires=("backbone.body", "head.classification_head", "head.regression_head"),
    modules=(("backbone", ("backbone.body",)),
             ("fpn", ("backbone",)),
             ("cls_head", ("head.classification_head",)),
             ("reg_head", ("head.regression_head", "head"))))

_SEGMENTATION_TV = Layout(
    "torchvision segmentation (FCN / DeepLabV3 / LRASPP)",
    requires=("backbone", "classifier"),
    modules=(("backbone", ("backbone",)),
             ("classifier", ("classifier",)),
             ("aux_classifier", ("aux_classifier",))))

_DETECTRON2 = Layout(
    "detectron2 (GeneralizedRCNN / RetinaNet / PanopticFPN)",
    requires=("backbone.bottom_up",),
    modules=(("backbone", ("backbone.bottom_up",)),
             ("fpn", ("backbone",)),  # the FPN is the backbone wrapped around bottom_up
             ("rpn", ("proposal_generator",)),
             ("roi_box", ("roi_heads",)),  # box_head + box_predictor
             ("roi_mask", ("roi_heads.mask_head",)),
             ("roi_keypoint", ("roi_heads.keypoint_head",)),
             ("sem_seg", ("sem_seg_head",)),
             ("head", ("head",))))  # one-stage heads

_MMDET = Layout(
    "mmdetection / mmsegmentation",
    requires=("backbone",),
    modules=(("backbone", ("backbone",)),
             ("neck", ("neck",)),
             ("rpn", ("rpn_head",)),
             ("roi_box", ("roi_head",)),  # bbox_head (cascades: every stage's)
             ("roi_mask", ("roi_head.mask_head",)),
             ("head", ("bbox_head",)),
             ("decode", ("decode_head",)),
             ("auxiliary", ("auxiliary_head",))))

_DETR = Layout(
    "DETR (backbone, transformer encoder / decoder, class and box heads)",
    requires=("backbone", "transformer.encoder", "transformer.decoder"),
    modules=(("backbone", ("backbone",)),
             ("encoder", ("transformer", "input_proj")),
             ("decoder", ("transformer.decoder", "query_embed")),
             ("class_head", ("class_embed",)),
             ("box_head", ("bbox_embed",))))

_DETR_FLAT = Layout(
    "DETR, flat (encoder / decoder at the top level)",
    requires=("backbone", "encoder", "decoder"),
    modules=(("backbone", ("backbone",)),
             ("encoder", ("encoder", "input_proj")),
             ("decoder", ("decoder", "query_embed", "query_position_embeddings")),
             ("class_head", ("class_embed", "class_labels_classifier")),
             ("box_head", ("bbox_embed", "bbox_predictor"))))

_HF_DETR = Layout(
    "Hugging Face DETR family (DETR / Deformable DETR / RT-DETR)",
    requires=("model.backbone", "model.encoder", "model.decoder"),
    modules=(("backbone", ("model.backbone",)),
             # what turns backbone maps into the encoder's memory: input projections, level
             # and learned position embeddings (a newer layout has them at model.*, an older
             # one inside the backbone wrapper), RT-DETR's hybrid encoder, and the two-stage
             # proposal layers that read the memory (enc_output*)
             ("encoder", ("model.encoder", "model.input_projection", "model.input_proj", "model.encoder_input_proj",
                          "model.level_embed", "model.position_embedding", "model.backbone.position_embedding",
                          "model.enc_output", "model.enc_output_norm")),
             # the queries and what feeds the decoder: query embeddings, reference points,
             # RT-DETR's denoising label embedding and decoder-side projections
             ("decoder", ("model.decoder", "model.query_position_embeddings", "model.reference_points",
                          "model.decoder_input_proj", "model.denoising_class_embed", "model.pos_trans",
                          "model.pos_trans_norm")),
             # heads by what they predict, wherever they hang: DETR's on top, Deformable DETR's
             # (box refinement / two-stage) and RT-DETR's inside the decoder, the two-stage
             # query-selection heads next to the encoder (enc_score_head / enc_bbox_head)
             ("class_head", ("class_labels_classifier", "class_embed", "model.decoder.class_embed",
                             "model.enc_score_head")),
             ("box_head", ("bbox_predictor", "bbox_embed", "model.decoder.bbox_embed", "model.enc_bbox_head"))))

#: tried in this order; torchvision before mmdetection, whose only requirement is ``backbone``
LAYOUTS: tuple[Layout, ...] = (_RCNN_TV, _ONE_STAGE_TV, _DETECTRON2, _DETR, _DETR_FLAT, _HF_DETR, _SEGMENTATION_TV, _MMDET)


def has_path(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule or a parameter of ``model``."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        pass
    try:
        model.get_parameter(path)
        return True
    except AttributeError:
        return False
