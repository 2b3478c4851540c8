"""``build_model(spec)``: a network plus its validated AGVM module partition, from a spec alone.

The partition is the contract with the AGVM core: module name -> parameter-name prefixes,
anchor first. A prefix ``p`` matches parameter ``n`` when ``n == p`` or ``n`` starts with
``p + "."``. Every trainable parameter must match exactly one module and every module must
match at least one trainable parameter; anything else is a spec error (the authors' release
silently never trained parameters that belonged to no module - not here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from agvm_ds.errors import ConfigError
from agvm_ds.families import get_family
from agvm_ds.config.spec import ModelSpec, load_spec
from agvm_ds.partition import classify_parameters

__all__ = ["build_model", "assign_modules", "partition_problems"]


def assign_modules(model: nn.Module, modules: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Module name -> names of the trainable parameters it owns, by the one partition rule
    (:func:`agvm_ds.partition.classify_parameters`); ``"<unassigned>"`` and
    ``"<ambiguous>"`` collect the problem cases instead of raising."""
    modules = modules if modules is not None else model.agvm_modules
    owner, unassigned, ambiguous, _ = classify_parameters(model, modules)
    out: dict[str, list[str]] = {m: [] for m in modules}
    for name, m in owner.items():
        out[m].append(name)
    out["<unassigned>"], out["<ambiguous>"] = unassigned, ambiguous
    return out


def partition_problems(model: nn.Module, modules: dict[str, list[str]] | None = None) -> list[str]:
    """Human-readable problems with a partition (empty list = valid)."""
    modules = modules if modules is not None else model.agvm_modules
    _, unassigned, ambiguous, empty = classify_parameters(model, modules)
    problems = []
    if unassigned:
        problems.append(f"{len(unassigned)} trainable parameters belong to no module "
                        f"(e.g. {', '.join(unassigned[:3])})")
    for name in ambiguous[:3]:
        problems.append(f"parameter {name!r} matches several modules with equally long prefixes")
    for m in empty:
        problems.append(f"module {m!r}: prefixes {modules[m]} match no parameter")
    return problems


def build_model(spec: "ModelSpec | dict | str | Path | Any", *, num_classes: int | None = None,
                overrides: dict[str, Any] | None = None, check_partition: bool = True) -> nn.Module:
    """Build the network a spec describes.

    Args:
        spec: a :class:`ModelSpec`, a dict, a JSON path (absolute, relative to the repo
            root, or a bare name in ``models/``), or a run file's ``ModelConfig`` section.
        num_classes: overrides the spec's ``num_classes`` (datasets know theirs).
        overrides: dotted-key overrides applied to the spec before validation.
        check_partition: raise :class:`ConfigError` when the AGVM partition is invalid.

    Returns an ``nn.Module`` with ``agvm_modules`` (anchor first) and ``agvm_anchor``.
    Works under ``with torch.device("meta"):`` (no memory, no checkpoint loading).
    """
    if hasattr(spec, "model_spec") and callable(spec.model_spec):  # a ModelConfig section
        overrides = {**spec.spec_overrides(), **(overrides or {})}
        spec = spec.spec
    overrides = dict(overrides or {})
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    spec = load_spec(spec, overrides)
    model = get_family(spec.architecture).load()(spec)  # the family's row (agvm_ds.families)
    if check_partition:
        problems = partition_problems(model)
        if problems:
            raise ConfigError(f"{spec.name}: modules: " + "; ".join(problems))
    return model
