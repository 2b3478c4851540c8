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


class ModelFileError(ConfigError):
    """A model folder, weights file or image that cannot be used; the message names it
    (:mod:`agvm_ds.inference`)."""
