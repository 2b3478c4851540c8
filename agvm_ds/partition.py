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

from agvm_ds.layouts import GENERIC, LAYOUTS, has_path

__all__ = ["NORM_TYPES", "PartitionError", "Partition", "InferredPartition", "classify_parameters",
           "infer_partition", "resolve_partition", "listed_no_decay", "param_groups", "groups_from_parameters"]

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
    source: str = "given"  # "given" (modules=), "declared" (agvm_modules) or an inferred layout's name

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


@dataclasses.dataclass(frozen=True)
class InferredPartition:
    """What :func:`infer_partition` found: ``modules`` (name → prefixes, anchor first), the
    ``anchor``, the ``layout`` that fitted (:mod:`agvm_ds.layouts`; ``"generic"`` for the
    fallback) and the layouts tried before it, each with why it did not fit."""

    modules: "OrderedDict[str, list[str]]"
    anchor: str
    layout: str
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def generic(self) -> bool:
        return self.layout == GENERIC


def infer_partition(model: nn.Module) -> InferredPartition:
    """The AGVM partition of a model that declares none, read from its attribute names.

    The layouts of :data:`agvm_ds.layouts.LAYOUTS` (torchvision, detectron2, DETR,
    mmdetection) are tried in order; the first whose required submodules exist and whose
    modules, once those without trainable parameters are dropped, leave no trainable
    parameter out (and keep at least two modules) wins. Otherwise the generic fallback:
    one module per top-level child (or top-level parameter) that holds trainable
    parameters, ``backbone`` as the anchor when there is one. Raises
    :class:`PartitionError` when the model has no trainable parameter at all.
    """
    rejected = []
    names = [n for n, _ in model.named_parameters()]
    for layout in LAYOUTS:
        if not all(has_path(model, path) for path in layout.requires):
            continue
        # a path that holds no parameter (a sine position embedding, an absent head) is no prefix
        modules = OrderedDict((m, [f"{p}." for p in paths if any(_matches(n, p) for n in names)])
                              for m, paths in layout.modules)
        modules = OrderedDict((m, ps) for m, ps in modules.items() if ps)
        owner, unassigned, ambiguous, empty = classify_parameters(model, modules)
        live = OrderedDict((m, ps) for m, ps in modules.items() if m not in empty)
        if unassigned or ambiguous or len(live) < 2:
            why = (f"{len(unassigned)} trainable parameter(s) outside its modules, e.g. {unassigned[0]}"
                   if unassigned else f"only {len(live)} module(s) hold trainable parameters")
            rejected.append((layout.name, why))
            continue
        anchor = layout.anchor if layout.anchor in live else next(iter(live))
        return InferredPartition(live, anchor, layout.name, tuple(rejected))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise PartitionError(f"{type(model).__name__} has no trainable parameter")
    modules = OrderedDict()
    for name in trainable:
        top = name.split(".", 1)[0]
        modules.setdefault(top, [f"{top}."])
    anchor = "backbone" if "backbone" in modules else next(iter(modules))
    modules.move_to_end(anchor, last=False)
    return InferredPartition(modules, anchor, GENERIC, tuple(rejected))


def _declared_or_inferred(model: nn.Module) -> tuple["OrderedDict[str, list[str]]", str, str]:
    """The partition and anchor a model declares (``agvm_modules`` / ``agvm_anchor``), else
    the inferred one; and where it came from."""
    modules = getattr(model, "agvm_modules", None)
    if modules:
        return OrderedDict(modules), getattr(model, "agvm_anchor", None) or next(iter(modules)), "declared"
    inferred = infer_partition(model)
    return inferred.modules, inferred.anchor, inferred.layout


def _dead_prefixes(model: nn.Module, modules: "OrderedDict[str, list[str]]") -> list[tuple[str, str]]:
    """(module, prefix) for every prefix that matches no parameter at all (frozen ones count)."""
    names = [n for n, _ in model.named_parameters()]
    return [(m, pre) for m, prefixes in modules.items() for pre in prefixes
            if not any(_matches(n, pre) for n in names)]


def _near(model: nn.Module, prefix: str) -> str:
    """``(did you mean 'x.'?)`` when a submodule path is close to a dead prefix."""
    import difflib

    paths = [f"{n}." for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(prefix if prefix.endswith(".") else prefix + ".", paths, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _overlaps(modules: "OrderedDict[str, list[str]]", ambiguous: list[str]) -> list[str]:
    """One line per pair of modules that claim the same prefix (with or without its dot) or
    tie on a parameter."""
    lines, pairs = [], set()
    first_claim: dict[str, str] = {}
    for m, prefixes in modules.items():
        for pre in prefixes:
            other = first_claim.setdefault(pre.rstrip("."), m)
            if other != m and (other, m) not in pairs:
                pairs.add((other, m))
                lines.append(f"modules {other!r} and {m!r} both claim prefix {pre!r}")
    for name in ambiguous:
        claim = [(len(p), m, p) for m, ps in modules.items() for p in ps if _matches(name, p)]
        best = max(c[0] for c in claim)
        (_, a, pa), (_, b, pb) = [c for c in claim if c[0] == best][:2]
        if (a, b) not in pairs:
            pairs.add((a, b))
            lines.append(f"modules {a!r} ({pa!r}) and {b!r} ({pb!r}) both claim {name!r}")
    return lines


def resolve_partition(model: nn.Module, modules: Mapping[str, list[str] | str] | None = None,
                      anchor: str | None = None) -> Partition:
    """The model's :class:`Partition`; raise :class:`PartitionError` where the rules fail.

    ``modules`` defaults to the model's ``agvm_modules`` (and the anchor to its
    ``agvm_anchor``), else to :func:`infer_partition`'s; given explicitly, its first module
    is the anchor unless ``anchor`` names another one. Errors name the dead prefix (one that
    matches no parameter) and the two modules that claim the same parameters.
    """
    source = "given"
    if modules is None:
        modules, declared, source = _declared_or_inferred(model)
        anchor = anchor if anchor is not None else declared
    if not modules:
        raise PartitionError("the module partition is empty")
    modules = OrderedDict((m, [p] if isinstance(p, str) else list(p)) for m, p in modules.items())
    anchor = anchor if anchor is not None else next(iter(modules))
    if anchor not in modules:
        raise PartitionError(f"anchor: unknown module {anchor!r} (modules: {list(modules)})")
    owner, unassigned, ambiguous, empty = classify_parameters(model, modules)
    orphans = ""
    if unassigned:
        shown = ", ".join(unassigned[:8]) + (" …" if len(unassigned) > 8 else "")
        orphans = (f"{len(unassigned)} trainable parameter(s) belong to no module: {shown} "
                   f"(no single module claims them, so AGVM would never modulate them)")
    dead = _dead_prefixes(model, modules)
    if dead:
        named = "; ".join(f"module {m!r}: prefix {p!r} matches no parameter{_near(model, p)}" for m, p in dead)
        raise PartitionError(named + (f"; {orphans}" if orphans else ""))
    overlaps = _overlaps(modules, ambiguous)
    if overlaps:
        raise PartitionError("; ".join(overlaps) + " with equally long prefixes (each parameter needs one owner)")
    if unassigned:
        raise PartitionError(orphans)
    if empty:
        raise PartitionError(f"module(s) {empty} match no trainable parameter (prefixes {[modules[m] for m in empty]})")
    return Partition(owner=owner, order=tuple(modules), anchor=anchor, source=source)


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
