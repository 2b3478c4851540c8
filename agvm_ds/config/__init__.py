"""Validated config sections that live beside DeepSpeed's own in one JSON run file."""

from agvm_ds.config.base import ConfigError, ConfigModel, parse_section

__all__ = ["ConfigError", "ConfigModel", "parse_section"]
