"""The partition rule: which module owns a trainable parameter (longest prefix wins).

The ground floor under :mod:`agvm_ds.partition` (resolution and groups) and
:mod:`agvm_ds.partition_infer` (layouts of models agvm-ds did not write): both apply this
one rule, so it sits below them. Imports torch and nothing of the package.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

from torch import nn

__all__ = ["PartitionError", "matches", "classify_parameters"]


class PartitionError(ValueError):
    """A module partition that leaves parameters out or names nothing."""


def matches(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under ``prefix`` (with or without its dot; ``""`` is everything)."""
    if prefix == "" or name == prefix.rstrip("."):
        return True
    return name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def classify_parameters(model: nn.Module, modules: Mapping[str, list[str] | str]):
    """Apply the partition rule without raising.

    Returns ``(owner, unassigned, ambiguous, empty)``: trainable parameter name → module
    (longest matching prefix wins), names matching no module, names matched by two modules
    with equally long prefixes, and modules that match no trainable parameter. The one
    rule every caller (training, the API, the partition report, inference) uses; the report
    needs the problem cases listed rather than raised.
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
                if not matches(name, pre):
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
