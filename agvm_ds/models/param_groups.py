"""Optimizer param groups per AGVM module, with no weight decay on norms and biases.

AGVM scales the learning rate of every group of a module by that module's multiplier, and
DeepSpeed flattens and partitions each group separately - so a group must never mix
modules. Within a module, parameters are split only by the hyper-parameters that differ
(as detectron2's ``get_default_optimizer_params`` does): normally one "decay" and one
"no-decay" group per module. Weight decay on normalization scales/shifts and on biases
only shrinks them towards an arbitrary zero, so they get ``weight_decay_norm`` /
``weight_decay_bias`` (0 by default); LayerScale gammas and other 1-d parameters count
as "norm-like" when ``no_decay_1d`` is set, and so do names a model lists in
``no_weight_decay()`` (timm's convention) and position tables such as Swin's
``relative_position_bias_table``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from agvm_ds.core.partition import listed_no_decay
from agvm_ds.models.build import assign_modules
from agvm_ds.models.layers import NORM_TYPES

__all__ = ["param_groups"]


def _norm_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        is_norm = isinstance(mod, NORM_TYPES) or type(mod).__name__.lower().endswith(("norm", "norm2d"))
        if is_norm:
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(model: nn.Module, weight_decay: float, *, modules: dict[str, list[str]] | None = None,
                 weight_decay_norm: float = 0.0, weight_decay_bias: float = 0.0,
                 no_decay_1d: bool = True, lr: float | None = None) -> list[dict[str, Any]]:
    """Param-group dicts for ``torch.optim`` / DeepSpeed, each tagged ``"module": name``.

    ``modules`` defaults to ``model.agvm_modules``. Groups come in module order (anchor
    first), decay group before no-decay group; groups with identical hyper-parameters
    inside one module are merged. Raises ``ValueError`` if a trainable parameter belongs
    to no module or to several (that would silently leave it out of AGVM or of training).
    """
    modules = modules if modules is not None else getattr(model, "agvm_modules", None)
    if modules is None:
        raise ValueError("param_groups: the model has no agvm_modules; pass modules=")
    owners = assign_modules(model, modules)
    bad = owners.pop("<unassigned>") + owners.pop("<ambiguous>")
    if bad:
        raise ValueError(f"param_groups: {len(bad)} trainable parameters belong to no single "
                         f"module (e.g. {', '.join(bad[:3])})")
    norm_names, listed = _norm_param_names(model), listed_no_decay(model)
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    for module, names in owners.items():
        by_hp: dict[float, dict[str, Any]] = {}
        for n in names:
            p = params[n]
            if n in norm_names or n in listed or (no_decay_1d and p.ndim <= 1 and not n.endswith(".bias")):
                wd = weight_decay_norm
            elif n.endswith(".bias"):
                wd = weight_decay_bias
            else:
                wd = weight_decay
            g = by_hp.setdefault(float(wd), {"params": [], "weight_decay": float(wd), "module": module})
            g["params"].append(p)
        for wd in sorted(by_hp, reverse=True):
            g = by_hp[wd]
            if lr is not None:
                g["lr"] = lr
            groups.append(g)
    return groups
