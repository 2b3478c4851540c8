"""agvm-ds: AGVM large-batch training of dense visual predictors inside DeepSpeed.

``agvm_ds.initialize`` (same return as ``deepspeed.initialize``) and
``agvm_ds.modulation(engine)`` are the API for your own DeepSpeed loop; ``launch/train.py``
is the ready-made job; ``agvm_ds.load_model(path)`` returns a trained network (export or
checkpoint) with ``predict(images)``.
"""

from agvm_ds import _compat  # noqa: F401  (must run before anything imports torchvision)
from agvm_ds.ops.torchvision_fallback import install as _install_torchvision_fallback  # noqa: E402

# torchvision's nms / roi_align on agvm-ds's kernels, only where its compiled ops are missing
_compat.after_torchvision_import(_install_torchvision_fallback)

__version__ = "0.1.0"


# Explicit, so static tools and readers can follow the front door. DeepSpeed itself is
# imported only inside ``initialize`` (it costs seconds and config/data/model work needs none).
from agvm_ds.api import initialize, modulation, set_gradient_clipping  # noqa: E402
from agvm_ds.partition import infer_partition  # noqa: E402

# After training (issue 25): a trained network from an export or a checkpoint of any ZeRO stage.
from agvm_ds.inference import load_model  # noqa: E402

__all__ = ["initialize", "infer_partition", "modulation", "set_gradient_clipping", "load_model", "__version__"]
