"""agvm-ds: AGVM large-batch training of dense visual predictors inside DeepSpeed."""

from agvm_ds import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
