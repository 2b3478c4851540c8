"""Module partitions: which parameters form the backbone, the neck, each head.

A partition maps a module name to parameter-name prefixes (``{"backbone": ["backbone."],
"neck": ["fpn."], ...}``). It is resolved against ``model.named_parameters()`` *before*
``deepspeed.initialize`` (afterwards the optimizer only holds flat partitions). The rules
are strict because a silently unmodulated parameter is the worst failure of the authors'
release: every trainable parameter must match exactly one module (longest prefix wins
when prefixes nest, e.g. ``head.`` vs ``head.cls.``), and every module must match at
least one parameter.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class PartitionError(ValueError):
    """A module partition that leaves parameters out or names nothing."""


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def classify_parameters(model: nn.Module, modules: dict[str, list[str] | str]):
    """Apply the partition rule without raising.

    Returns ``(owner, unassigned, ambiguous, empty)``: trainable parameter name → module
    (longest matching prefix wins), names matching no module, names matched by two modules
    with equally long prefixes, and modules that match no trainable parameter. The one
    rule every caller (training, the API, the partition report) uses.
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


def resolve_partition(model: nn.Module, modules: dict[str, list[str] | str]) -> "OrderedDict[str, str]":
    """Map every trainable parameter name to its module; raise :class:`PartitionError` otherwise."""
    if not modules:
        raise PartitionError("the module partition is empty")
    owner, unassigned, ambiguous, empty = classify_parameters(model, modules)
    if ambiguous:
        raise PartitionError(f"parameter(s) {ambiguous[:8]} match two modules with equally long prefixes")
    if unassigned:
        shown = ", ".join(unassigned[:8]) + (" …" if len(unassigned) > 8 else "")
        raise PartitionError(f"{len(unassigned)} trainable parameter(s) belong to no module: {shown}")
    if empty:
        raise PartitionError(f"module(s) {empty} match no trainable parameter (prefixes {[modules[m] for m in empty]})")
    return owner


def model_partition(model: nn.Module) -> tuple["OrderedDict[str, list[str]]", str]:
    """The partition and anchor a model declares (``agvm_modules`` / ``agvm_anchor``)."""
    modules = getattr(model, "agvm_modules", None)
    if not modules:
        raise PartitionError(f"{type(model).__name__} declares no `agvm_modules`; pass modules= explicitly")
    anchor = getattr(model, "agvm_anchor", None) or next(iter(modules))
    return OrderedDict(modules), anchor


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


def _no_decay(name: str, p: torch.Tensor, listed: set[str]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or name in listed


def build_param_groups(model: nn.Module, owner: "OrderedDict[str, str]", module_order: list[str],
                       weight_decay: float | None = None, no_decay_norms: bool = True) -> list[dict]:
    """One or two groups per module (decay / no-decay for norms, biases and the tables of
    :func:`listed_no_decay`), tagged ``module``.

    Groups are merged as far as the hyper-parameters allow (detectron2 style): at most two
    per module. Without ``weight_decay`` (use the optimizer's default) all of a module's
    parameters share one group.
    """
    buckets: dict[tuple[str, bool], list] = OrderedDict()
    for m in module_order:
        buckets[(m, False)] = []
        buckets[(m, True)] = []
    listed = listed_no_decay(model)
    for name, p in model.named_parameters():
        if name not in owner:
            continue
        nd = bool(weight_decay is not None and no_decay_norms and _no_decay(name, p, listed))
        buckets[(owner[name], nd)].append(p)
    groups = []
    for (m, nd), params in buckets.items():
        if not params:
            continue
        g = {"params": params, "module": m}
        if weight_decay is not None:
            g["weight_decay"] = 0.0 if nd else weight_decay
        groups.append(g)
    return groups


def groups_from_parameters(model: nn.Module, owner: "OrderedDict[str, str]", param_groups: list[dict]) -> list[dict]:
    """Tag user-supplied param groups with their module, splitting groups that span modules."""
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
