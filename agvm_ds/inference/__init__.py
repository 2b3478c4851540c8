"""Life after training: load, export and run a trained model without DeepSpeed's engine.

:func:`load_model` (also ``agvm_ds.load_model``) builds the network of an export folder or of
a training checkpoint from any ZeRO stage; :func:`export_checkpoint` writes an export
(``model.safetensors`` + ``config.json``). ``launch/evaluate.py``, ``launch/predict.py`` and
``launch/export.py`` are the command-line tools over them.
"""

from agvm_ds.inference.model_dir import ModelFileError, export_checkpoint, load_model

__all__ = ["ModelFileError", "export_checkpoint", "load_model"]
