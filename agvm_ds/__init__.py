"""agvm-ds: AGVM large-batch training of dense visual predictors inside DeepSpeed.

``agvm_ds.initialize`` (same return as ``deepspeed.initialize``) and
``agvm_ds.modulation(engine)`` are the API for your own DeepSpeed loop; ``launch/train.py``
is the ready-made job.
"""

from agvm_ds import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing deepspeed costs seconds and is not needed for config/data/model work.
    if name in ("initialize", "modulation", "set_gradient_clipping"):
        from agvm_ds import api

        return getattr(api, name)
    raise AttributeError(f"module 'agvm_ds' has no attribute {name!r}")


__all__ = ["initialize", "modulation", "set_gradient_clipping", "__version__"]
