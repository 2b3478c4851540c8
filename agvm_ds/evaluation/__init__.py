"""Evaluation: COCO results conversion, COCO box/mask AP, mIoU, distributed evaluation."""

from agvm_ds.evaluation.coco_eval import STAT_NAMES, evaluate_coco, evaluate_results, stat_keys
from agvm_ds.evaluation.miou import confusion_matrix, mean_iou, miou_from_confusion
from agvm_ds.evaluation.results import encode_mask, to_coco_results

__all__ = ["STAT_NAMES", "confusion_matrix", "encode_mask", "evaluate_coco", "evaluate_dataset",
           "evaluate_results", "mean_iou", "miou_from_confusion", "stat_keys", "to_coco_results"]


def __getattr__(name: str):
    # evaluate_dataset pulls in the data package; import it only when asked for.
    if name == "evaluate_dataset":
        from agvm_ds.evaluation.distributed import evaluate_dataset
        return evaluate_dataset
    raise AttributeError(f"module 'agvm_ds.evaluation' has no attribute {name!r}")
