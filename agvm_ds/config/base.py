"""Shared base for every validated config section (DeepSpeed's ``DeepSpeedConfigModel`` style).

Each JSON section gets one pydantic model with ``extra="forbid"`` and bounds in
``Field(ge=..., lt=...)``. :class:`agvm_ds.errors.ConfigError` (one place: every room imports
it from there) is the single exception type user-facing code raises for a bad config; its
message always names the offending key as a dotted path.
Floats are finite everywhere (``allow_inf_nan=False``): JSON has no NaN or infinity, and
Python's reader accepting them (``--override agvm.clamp.1=NaN``) must not let one through
to the core, which would refuse it only after the data and the model are built. An unknown
key at any depth is answered with the closest known key of its section (``did you mean``).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from agvm_ds.errors import ConfigError

__all__ = ["ConfigModel", "format_validation_error", "parse_section"]


class ConfigModel(BaseModel):
    # frozen: a section is validated once, when the run file is read, and never edited
    # afterwards (derived values go into a new object: agvm_ds.train.resolve)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (``Optional[X]``, ``list[X]``, ``X | Y`` …)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _has_tag(cls: type[BaseModel], tag) -> bool:
    """Whether ``tag`` is the value of one of ``cls``'s ``Literal`` fields (its union tag)."""
    return any(typing.get_origin(f.annotation) is typing.Literal and tag in typing.get_args(f.annotation)
               for f in cls.model_fields.values())


def _known_keys(model: Optional[type[BaseModel]], path: tuple) -> list[str]:
    """The keys the object at ``path`` (a pydantic error location) inside ``model`` accepts."""
    candidates = [model] if model is not None else []
    for part in path:
        if isinstance(part, int):
            continue  # a list or tuple item: same candidate models
        nxt = []
        for cls in candidates:
            field = cls.model_fields.get(part)
            if field is None:
                field = next((f for f in cls.model_fields.values() if f.alias == part), None)
            if field is not None:
                nxt += _models_in(field.annotation)
            elif _has_tag(cls, part):  # a discriminated union names the member it validated
                nxt.append(cls)
        candidates = nxt
    keys: list[str] = []
    for cls in candidates:
        for name, field in cls.model_fields.items():
            keys += [name] + ([field.alias] if field.alias else [])
    return keys


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` keys, or ``""``."""
    close = difflib.get_close_matches(str(key), sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(err: ValidationError, section: str, model: Optional[type[BaseModel]] = None) -> str:
    """One line per problem, each starting with the full dotted key path; an unknown key
    names the closest key its section knows when ``model`` (the validated class) is given."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if e["loc"]:
                msg += did_you_mean(e["loc"][-1], _known_keys(model, tuple(e["loc"][:-1])))
        elif e["type"] == "finite_number":
            msg = f"must be a finite number, got {e.get('input')!r}"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_section(model: type[BaseModel], data, section: str):
    """Validate ``data`` as ``model``; raise :class:`ConfigError` naming ``section.key``."""
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, section, model)) from None
