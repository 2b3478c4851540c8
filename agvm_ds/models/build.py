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

from agvm_ds.config.base import ConfigError
from agvm_ds.models.spec import ModelSpec, load_spec

__all__ = ["build_model", "assign_modules", "partition_problems", "ARCHITECTURES"]


def _architectures():
    from agvm_ds.models.detectors.rcnn import FasterRCNN, MaskRCNN
    from agvm_ds.models.detectors.retinanet import RetinaNet
    from agvm_ds.models.detectors.semantic_fpn import SemanticFPN
    return {"retinanet": RetinaNet, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN,
            "semantic_fpn": SemanticFPN}


ARCHITECTURES = ("retinanet", "faster_rcnn", "mask_rcnn", "semantic_fpn")


def _matches(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def assign_modules(model: nn.Module, modules: dict[str, list[str]] | None = None,
                   trainable_only: bool = True) -> dict[str, list[str]]:
    """Module name -> names of the parameters its prefixes match (``"<unassigned>"`` and
    ``"<ambiguous>"`` collect the problem cases instead of raising)."""
    modules = modules if modules is not None else model.agvm_modules
    out: dict[str, list[str]] = {m: [] for m in modules}
    out["<unassigned>"], out["<ambiguous>"] = [], []
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        hits = [m for m, prefixes in modules.items() if any(_matches(name, q) for q in prefixes)]
        out[hits[0] if len(hits) == 1 else ("<unassigned>" if not hits else "<ambiguous>")].append(name)
    return out


def partition_problems(model: nn.Module, modules: dict[str, list[str]] | None = None) -> list[str]:
    """Human-readable problems with a partition (empty list = valid)."""
    modules = modules if modules is not None else model.agvm_modules
    groups = assign_modules(model, modules)
    problems = []
    if groups["<unassigned>"]:
        names = groups["<unassigned>"]
        problems.append(f"{len(names)} trainable parameters belong to no module "
                        f"(e.g. {', '.join(names[:3])})")
    for name in groups["<ambiguous>"][:3]:
        owners = [m for m, pre in modules.items() if any(_matches(name, q) for q in pre)]
        problems.append(f"parameter {name!r} matches several modules ({', '.join(owners)})")
    for m, prefixes in modules.items():
        if not any(_matches(n, q) for n, _ in model.named_parameters() for q in prefixes):
            problems.append(f"module {m!r}: prefixes {prefixes} match no parameter")
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
    model = _architectures()[spec.architecture](spec)
    if check_partition:
        problems = partition_problems(model)
        if problems:
            raise ConfigError(f"{spec.name}: modules: " + "; ".join(problems))
    return model
