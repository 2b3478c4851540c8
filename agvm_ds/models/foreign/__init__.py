"""Detectors agvm-ds did not write, built from their own libraries' configs and wrapped in the
detector contract of docs/interfaces.md (``hf_detr``: Hugging Face DETR, Deformable DETR, RT-DETR)."""

from agvm_ds.models.foreign.hf_detr import FAMILIES, HFDetectorContract, build_hf_detector

__all__ = ["FAMILIES", "HFDetectorContract", "build_hf_detector"]
