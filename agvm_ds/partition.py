"""The module partition and the optimizer groups cut along it: one rule, one builder.

A partition maps a module name to parameter-name prefixes (``{"backbone": ["backbone."],
"neck": ["fpn."], ...}``). It is resolved against ``model.named_parameters()`` *before*
``deepspeed.initialize`` (afterwards the optimizer only holds flat partitions), once per
run: training, :func:`agvm_ds.initialize` and the partition report all take the
:class:`Partition` this module returns. The rules are strict because a silently
unmodulated parameter is the worst failure of the authors' release: every trainable
parameter must match exactly one module (longest prefix wins when prefixes nest, e.g.
``head.`` vs ``head.cls.``), and every module must match at least one parameter.

AGVM scales the learning rate of every group of a module by that module's multiplier,
and DeepSpeed flattens and partitions each group separately — so a group must never mix
modules. :func:`param_groups` is the only place that decides which parameters decay.

This module sits on the ground floor: it imports torch and nothing of the package, so
``models/``, ``train/`` and the API can all build on it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Mapping

from torch import nn

__all__ = ["NORM_TYPES", "PartitionError", "Partition", "classify_parameters", "resolve_partition",
           "listed_no_decay", "param_groups", "groups_from_parameters"]

# Norm layers get no weight decay (see param_groups); keep this tuple complete.
# FrozenBatchNorm2d is absent on purpose: it owns no parameters, and a residual branch must
# never have its frozen scale zeroed (uninet_blocks._zero_last_norm looks norms up here).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


class PartitionError(ValueError):
    """A module partition that leaves parameters out or names nothing."""


@dataclasses.dataclass(frozen=True)
class Partition:
    """A resolved partition: who owns each trainable parameter, in which module order.

    ``owner`` maps every trainable parameter name (in ``named_parameters()`` order) to its
    module; ``order`` is the module order groups and the modulator follow (the declared
    order, anchor first unless the anchor was named separately); ``anchor`` is the module
    whose gradient variance the others are matched to. Built by :func:`resolve_partition`,
    which guarantees the strict rules above, so holders never re-check.
    """

    owner: "OrderedDict[str, str]"
    order: tuple[str, ...]
    anchor: str

    def with_anchor(self, anchor: str) -> "Partition":
        """The same partition with another anchor; the anchor must be one of its modules."""
        if anchor not in self.order:
            raise PartitionError(f"anchor: unknown module {anchor!r} (modules: {list(self.order)})")
        return dataclasses.replace(self, anchor=anchor)


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def classify_parameters(model: nn.Module, modules: Mapping[str, list[str] | str]):
    """Apply the partition rule without raising.

    Returns ``(owner, unassigned, ambiguous, empty)``: trainable parameter name → module
    (longest matching prefix wins), names matching no module, names matched by two modules
    with equally long prefixes, and modules that match no trainable parameter. The one
    rule every caller (training, the API, the partition report) uses; the report needs the
    problem cases listed rather than raised.
    """
    norm = OrderedDict((m, [p] if isinstance(p, str) else list(p)) for m, p in modules.items())
    owner: OrderedDict[str, str] = OrderedDict()
    unassigned, ambiguous = [], []
    hits = {m: 0 for m in norm}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        best, best_len, tie = None, -1, False
        for m, prefixes in norm.items():
            for pre in prefixes:
                if not _matches(name, pre):
                    continue
                if len(pre) > best_len:
                    best, best_len, tie = m, len(pre), False
                elif len(pre) == best_len and m != best:
                    tie = True
        if best is None:
            unassigned.append(name)
        elif tie:
            ambiguous.append(name)
        else:
            owner[name] = best
            hits[best] += 1
    empty = [m for m, n in hits.items() if n == 0]
    return owner, unassigned, ambiguous, empty


def _declared_modules(model: nn.Module) -> tuple["OrderedDict[str, list[str]]", str]:
    """The partition and anchor a model declares (``agvm_modules`` / ``agvm_anchor``)."""
    modules = getattr(model, "agvm_modules", None)
    if not modules:
        raise PartitionError(f"{type(model).__name__} declares no `agvm_modules`; pass modules= explicitly")
    anchor = getattr(model, "agvm_anchor", None) or next(iter(modules))
    return OrderedDict(modules), anchor


def resolve_partition(model: nn.Module, modules: Mapping[str, list[str] | str] | None = None,
                      anchor: str | None = None) -> Partition:
    """The model's :class:`Partition`; raise :class:`PartitionError` where the rules fail.

    ``modules`` defaults to the model's ``agvm_modules`` (and the anchor to its
    ``agvm_anchor``); given explicitly, its first module is the anchor unless ``anchor``
    names another one.
    """
    if modules is None:
        modules, declared = _declared_modules(model)
        anchor = anchor if anchor is not None else declared
    if not modules:
        raise PartitionError("the module partition is empty")
    modules = OrderedDict(modules)
    anchor = anchor if anchor is not None else next(iter(modules))
    if anchor not in modules:
        raise PartitionError(f"anchor: unknown module {anchor!r} (modules: {list(modules)})")
    owner, unassigned, ambiguous, empty = classify_parameters(model, modules)
    if ambiguous:
        raise PartitionError(f"parameter(s) {ambiguous[:8]} match two modules with equally long prefixes")
    if unassigned:
        shown = ", ".join(unassigned[:8]) + (" …" if len(unassigned) > 8 else "")
        raise PartitionError(f"{len(unassigned)} trainable parameter(s) belong to no module: {shown} "
                             f"(no single module claims them, so AGVM would never modulate them)")
    if empty:
        raise PartitionError(f"module(s) {empty} match no trainable parameter (prefixes {[modules[m] for m in empty]})")
    return Partition(owner=owner, order=tuple(modules), anchor=anchor)


# Parameter (leaf) names that are embeddings/tables, not weights: timm lists them in
# ``no_weight_decay()``, which its features_only wrappers no longer expose.
_EMBEDDING_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token",
                    "dist_token", "rel_pos_h", "rel_pos_w")


def listed_no_decay(model: nn.Module) -> set[str]:
    """Parameters a model exempts from weight decay beyond norms and biases: position
    tables/embeddings by name, and whatever a submodule's ``no_weight_decay()`` lists."""
    names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in _EMBEDDING_NAMES}
    for mod_name, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            try:
                listed = fn()
            except TypeError:
                continue
            names.update(f"{mod_name}.{n}" if mod_name else n for n in listed)
    return names


def _norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters owned by normalization layers (by type; timm's own ``*Norm`` / ``*Norm2d``
    classes by name, since they need not derive from torch's)."""
    names = set()
    for mod_name, mod in model.named_modules():
        is_norm = isinstance(mod, NORM_TYPES) or type(mod).__name__.lower().endswith(("norm", "norm2d"))
        if is_norm:
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(model: nn.Module, partition: Partition, weight_decay: float | None = None, *,
                 norm_bias_decay: bool = False, weight_decay_norm: float = 0.0,
                 weight_decay_bias: float = 0.0, lr: float | None = None) -> list[dict[str, Any]]:
    """Param-group dicts for ``torch.optim`` / DeepSpeed, each tagged ``"module": name``.

    Weight decay on normalization scales/shifts, biases, other 1-d parameters (LayerScale
    gammas) and position tables only shrinks them towards an arbitrary zero, so by default
    (detectron2 / timm style) those get ``weight_decay_norm`` (norms, 1-d, tables listed by
    :func:`listed_no_decay`) or ``weight_decay_bias`` (biases), 0 unless set.
    ``norm_bias_decay=True`` gives every parameter ``weight_decay`` — what
    ``deepspeed.initialize`` does with the same JSON. Without ``weight_decay`` (the
    optimizer's default applies) groups carry no ``weight_decay`` key and each module is
    one group.

    Groups come in partition order (anchor first), at most one per distinct weight decay
    within a module, the larger decay first: normally one "decay" and one "no-decay" group
    per module. Parameters keep ``named_parameters()`` order inside a group; frozen ones
    are left out. ``lr``, when given, is set on every group.
    """
    owner = partition.owner
    # module -> weight decay -> group (None: no weight_decay key, the optimizer's default)
    by_module: dict[str, dict[float | None, dict[str, Any]]] = OrderedDict((m, {}) for m in partition.order)
    exempt = weight_decay is not None and not norm_bias_decay
    norm_names = _norm_parameter_names(model) if exempt else set()
    listed = listed_no_decay(model) if exempt else set()
    for name, p in model.named_parameters():
        if name not in owner:
            continue
        if not exempt:
            wd = weight_decay
        elif name in norm_names or name in listed or (p.ndim <= 1 and not name.endswith(".bias")):
            wd = weight_decay_norm
        elif name.endswith(".bias"):
            wd = weight_decay_bias
        else:
            wd = weight_decay
        module = owner[name]
        group = by_module[module].get(wd)
        if group is None:
            group = by_module[module][wd] = {"params": [], "module": module}
            if wd is not None:
                group["weight_decay"] = wd
        group["params"].append(p)
    groups: list[dict[str, Any]] = []
    for module_groups in by_module.values():
        for key in sorted(module_groups, key=lambda k: -k if k is not None else 0.0):
            g = module_groups[key]
            if lr is not None:
                g["lr"] = lr
            groups.append(g)
    return groups


def groups_from_parameters(model: nn.Module, partition: Partition, param_groups: list) -> list[dict]:
    """Tag user-supplied param groups with their module, splitting groups that span modules."""
    owner = partition.owner
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = []
    for gi, g in enumerate(param_groups):
        params = g["params"] if isinstance(g, dict) else g
        by_module: dict[str, list] = OrderedDict()
        for p in params:
            n = name_of.get(id(p))
            if n is None:
                raise PartitionError(f"param group {gi} holds a tensor that is not a parameter of the model")
            if n not in owner:
                continue  # frozen
            by_module.setdefault(owner[n], []).append(p)
        for m, ps in by_module.items():
            new = {k: v for k, v in g.items() if k != "params"} if isinstance(g, dict) else {}
            if "module" in new and new["module"] != m:
                raise PartitionError(f"param group {gi} says module {new['module']!r} but holds parameters of {m!r}")
            new.update(params=ps, module=m)
            out.append(new)
    covered = {id(p) for g in out for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if n in owner and id(p) not in covered]
    if missing:
        raise PartitionError(f"trainable parameters missing from model_parameters: {missing[:8]}")
    return out
