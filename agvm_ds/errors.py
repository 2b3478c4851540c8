"""The user-error type every room raises for a bad config (the ground floor: imports nothing).

:class:`ConfigError` lives here, not in :mod:`agvm_ds.config`, so rooms below the config
loader (``optim/``'s registry and layer-wise optimizers) can refuse a setting without
importing the room that reads run files; every module imports it from here
(tests/test_layering.py checks that no other module is used as a second source).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file, an override or an API argument; the message names
    the key as a dotted path and is printed as one ``error:`` line."""


class CheckpointError(ConfigError):
    """A checkpoint that is refused (unsafe, damaged, or saved for another layout); the
    launcher reports it as an ``error:`` line and exit code 2, like a bad ``--resume``.
    ``same_on_every_rank``: every rank raised this same error (only rank 0 prints it).
    Here, not beside the checkpoint engine, so that reading a marker (agvm_ds.inference)
    does not import DeepSpeed."""

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


class ModelFileError(ConfigError):
    """A model folder, weights file or image that cannot be used; the message names it
    (:mod:`agvm_ds.inference`)."""


class UntrustedCodeError(ConfigError):
    """A model whose builder is user code (``model.builder`` ``package.module:function``),
    rebuilt without ``trust_code=True``: the message names the code."""
