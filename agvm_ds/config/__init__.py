"""Validated config sections that live beside DeepSpeed's own in one JSON run file."""

from agvm_ds.config.base import ConfigModel, parse_section

__all__ = ["ConfigModel", "parse_section"]
