"""Shared base for every validated config section (DeepSpeed's ``DeepSpeedConfigModel`` style).

Each JSON section gets one pydantic model with ``extra="forbid"`` and bounds in
``Field(ge=..., lt=...)``. :class:`ConfigError` is the single exception type user-facing
code raises for a bad config; its message always names the offending key as a dotted path.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from agvm_ds.errors import ConfigError

__all__ = ["ConfigError", "ConfigModel", "format_validation_error", "parse_section"]


class ConfigModel(BaseModel):
    # frozen: a section is validated once, when the run file is read, and never edited
    # afterwards (derived values go into a new object: agvm_ds.train.resolve)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def format_validation_error(err: ValidationError, section: str) -> str:
    """One line per problem, each starting with the full dotted key path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_section(model: type[BaseModel], data, section: str):
    """Validate ``data`` as ``model``; raise :class:`ConfigError` naming ``section.key``."""
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, section)) from None
