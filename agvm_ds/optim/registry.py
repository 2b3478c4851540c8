"""The base optimizers AGVM can wrap, one frozen row each, instead of guessing from names.

A row says how to import the class (lazily: ``"module:Class"``), which per-parameter state
tensors it keeps (for the memory report), which of them is an exponential moving average of
g² that AGVM may precondition with (and the names of that average's β2 and eps), whether
``step()`` computes statistics over *whole tensors* (a trust ratio, a factored moment, an
orthogonalization) and, if so, whether it has an *exact* path on ZeRO's flat partitions,
and what ``agvm.precondition: "auto"`` resolves to.

Rules, applied by :func:`check` before any heavy work (config validation and
``agvm_ds.initialize``):

* ZeRO ≥ 1 hands ``step()`` flat 1-D partitions that cut through tensors. An element-wise
  optimizer is exact there; a whole-tensor one is exact only with a partition path (our
  :mod:`agvm_ds.optim` Lamb/Lars), otherwise it is refused (``optimizer.type`` error).
* Any other ``torch.optim`` class or dotted path gets the *fallback* row: its properties are
  unknown, so it is refused under ZeRO ≥ 1 unless the class declares
  ``agvm_elementwise = True``, and it is never preconditioned.
* ``precondition: "adam"`` needs a row with a second moment: ĝ = g / (√(β2·v + (1−β2)·g²) +
  eps), v = that state. RMSprop qualifies (v = ``square_avg``, β2 = ``alpha``; its own update
  divides by √v + eps with no bias correction, so the formula is its preconditioner
  exactly) unless ``centered`` (the denominator then subtracts the mean). ``auto`` stays
  ``none`` for RMSprop, as for every base the paper does not precondition.
* Lion (sign of an interpolated momentum) and Adamax (an infinity norm ``exp_inf``) keep no
  g² average: AGVM measures Φ on raw gradients there (``auto`` → none; ``adam`` refused).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from agvm_ds.errors import ConfigError

#: A class attribute a third-party optimizer sets to say its step is element-wise (exact on
#: ZeRO's flat partitions). Only the fallback row reads it.
ELEMENTWISE_FLAG = "agvm_elementwise"


@dataclass(frozen=True)
class OptimizerInfo:
    """One base optimizer. ``whole_tensor`` None means unknown (the fallback row)."""

    name: str
    target: Optional[str]                      # "module:Class", imported on first use
    aliases: tuple[str, ...] = ()              # other spellings (case-insensitive)
    state: tuple[str, ...] = ()                # per-parameter state tensors (besides "step")
    optional_state: tuple[tuple[str, str], ...] = ()  # (hyper-parameter, state) kept when it is truthy
    second_moment: Optional[str] = None        # state key of the g² average AGVM may precondition with
    beta2: Optional[str] = None                # its decay: "betas[1]" or a plain key such as "alpha"
    eps: Optional[str] = None
    whole_tensor: Optional[bool] = False       # step() computes statistics over whole tensors
    exact_partition: bool = False              # ... and is still exact on ZeRO flat partitions
    auto_precondition: Literal["adam", "none"] = "none"
    no_precondition_if: tuple[str, ...] = ()   # hyper-parameters that change the denominator
    factored: bool = False                     # state is O(rows + cols): not listed per parameter
    zero_refused: str = ""                     # a measured reason it fails under ZeRO >= 1 anyway
    note: str = ""

    def load(self) -> type:
        """Import the class (ConfigError naming ``optimizer.type`` if that fails)."""
        if self.target is None:
            raise ConfigError(f"optimizer.type: {self.name} has no class to import")
        mod, _, attr = self.target.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"optimizer.type: {self.name}: cannot import {mod}.{attr} ({err})") from None
        return obj

    def zero_safe(self) -> bool:
        """Exact on ZeRO ≥ 1: element-wise, or whole-tensor with a partition path."""
        return not self.zero_refused and (self.whole_tensor is False or self.exact_partition)

    def state_names(self, params: dict | None = None) -> tuple[str, ...]:
        """The state tensors kept per parameter with these hyper-parameters."""
        params = params or {}
        extra = tuple(s for hp, s in self.optional_state if params.get(hp))
        return self.state + extra

    def beta2_of(self, group: dict) -> float:
        key, _, index = self.beta2.partition("[")
        value = group[key]
        return float(value[int(index.rstrip("]"))] if index else value)

    def eps_of(self, group: dict) -> float:
        return float(group[self.eps])


_ADAM = dict(second_moment="exp_avg_sq", beta2="betas[1]", eps="eps", auto_precondition="adam")

ROWS: tuple[OptimizerInfo, ...] = (
    OptimizerInfo("SGD", "torch.optim:SGD", optional_state=(("momentum", "momentum_buffer"),)),
    OptimizerInfo("AdamW", "torch.optim:AdamW", state=("exp_avg", "exp_avg_sq"),
                  optional_state=(("amsgrad", "max_exp_avg_sq"),), **_ADAM),
    OptimizerInfo("Adam", "torch.optim:Adam", state=("exp_avg", "exp_avg_sq"),
                  optional_state=(("amsgrad", "max_exp_avg_sq"),), **_ADAM),
    OptimizerInfo("Lamb", "agvm_ds.optim.lamb:Lamb", state=("exp_avg", "exp_avg_sq"),
                  whole_tensor=True, exact_partition=True, **_ADAM,
                  note="layer-wise trust ratio, exact on partitions (segment maps)"),
    OptimizerInfo("Lars", "agvm_ds.optim.lars:Lars", optional_state=(("momentum", "momentum_buffer"),),
                  whole_tensor=True, exact_partition=True,
                  note="layer-wise trust ratio, exact on partitions (segment maps)"),
    OptimizerInfo("Lion", "timm.optim:Lion", state=("exp_avg",),
                  note="no g² average: raw-gradient Φ"),
    OptimizerInfo("RMSprop", "torch.optim:RMSprop", state=("square_avg",),
                  optional_state=(("momentum", "momentum_buffer"), ("centered", "grad_avg")),
                  second_moment="square_avg", beta2="alpha", eps="eps", no_precondition_if=("centered",),
                  note="`adam` allowed (v = square_avg, β2 = alpha), not when centered"),
    OptimizerInfo("Adamax", "torch.optim:Adamax", state=("exp_avg", "exp_inf"),
                  note="exp_inf is an infinity norm, not g²: raw-gradient Φ"),
    OptimizerInfo("Adagrad", "torch.optim:Adagrad", state=("sum",),
                  zero_refused="creates its state at construction for the unpartitioned parameters, so "
                               "under ZeRO's flat partitions every checkpoint fails (KeyError in state_dict, "
                               "measured on DeepSpeed 0.19.8)",
                  note="a sum of g², not an average: raw-gradient Φ; stage 0 only"),
    OptimizerInfo("Adafactor", "torch.optim:Adafactor", whole_tensor=True, factored=True,
                  note="factored row/column moments: stage 0 only"),
    OptimizerInfo("Muon", "torch.optim:Muon", state=("momentum_buffer",), whole_tensor=True,
                  note="orthogonalizes whole matrices: stage 0 only"),
    OptimizerInfo("timm.optim.Lamb", "timm.optim:Lamb", aliases=("timm.optim.lamb.Lamb",),
                  state=("exp_avg", "exp_avg_sq"), whole_tensor=True, **_ADAM,
                  note="per-tensor trust ratio, no partition path: stage 0 only"),
    OptimizerInfo("timm.optim.Lars", "timm.optim:Lars", aliases=("timm.optim.lars.Lars",),
                  optional_state=(("momentum", "momentum_buffer"),), whole_tensor=True,
                  note="per-tensor trust ratio, no partition path: stage 0 only"),
)

#: Any other torch.optim class or dotted path: properties unknown.
FALLBACK = OptimizerInfo("(any other torch.optim class or dotted path)", None, whole_tensor=None,
                         note=f"stage 0, or ZeRO if the class sets `{ELEMENTWISE_FLAG} = True`; "
                              "never preconditioned")


def _canonical(name: str) -> str:
    return name.strip().lower()


_BY_NAME = {_canonical(n): row for row in ROWS for n in (row.name, *row.aliases,
                                                         row.target.replace(":", "."))}


def _resolve_class(name: str) -> type:
    import torch

    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == _canonical(name) and inspect.isclass(obj):
            return obj
    if "." in name:
        mod, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"optimizer.type: cannot import {name!r} ({err})") from None
    known = ", ".join(r.name for r in ROWS if "." not in r.name)
    raise ConfigError(f"optimizer.type: unknown optimizer {name!r} (one of {known}, "
                      "any torch.optim class, or a dotted path to a torch.optim.Optimizer subclass)")


def lookup(name: str) -> Optional[OptimizerInfo]:
    """The registered row of a name or alias, without importing anything; None if unknown."""
    return _BY_NAME.get(_canonical(str(name)))


def find(name: str) -> OptimizerInfo:
    """The row for ``optimizer.type``: a registered name/alias, else the fallback row for the
    torch.optim class or dotted path it names (imported now, to read its declaration)."""
    import torch

    row = _BY_NAME.get(_canonical(str(name)))
    if row is not None:
        return row
    cls = _resolve_class(str(name))
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer.type: {name!r} is not a torch.optim.Optimizer subclass")
    row = _row_of_class(cls)
    if row is not None:  # a registered class under another spelling
        return row
    declared = getattr(cls, ELEMENTWISE_FLAG, False) is True
    return dataclasses.replace(FALLBACK, name=str(name), target=f"{cls.__module__}:{cls.__qualname__}",
                               whole_tensor=False if declared else None)


def _row_of_class(cls: type) -> Optional[OptimizerInfo]:
    # A row whose module is not imported yet cannot hold this (already imported) class.
    for row in ROWS:
        mod, _, attr = row.target.partition(":")
        if mod in sys.modules and getattr(sys.modules[mod], attr, None) is cls:
            return row
    return None


def check(row: OptimizerInfo, params: dict | None, stage: int, precondition: str) -> str:
    """Refuse a base that is wrong under ``stage`` or a precondition it cannot honour; return
    the preconditioning to use (``"adam"`` or ``"none"``)."""
    if stage >= 1 and row.zero_refused:
        raise ConfigError(f"optimizer.type: {row.name} {row.zero_refused}; use zero_optimization.stage 0")
    if stage >= 1 and not row.zero_safe():
        if row.whole_tensor is None:
            raise ConfigError(f"optimizer.type: {row.name} is not in agvm-ds's optimizer registry, so under ZeRO "
                              f"stage {stage} its step() may compute per-tensor statistics on flat partitions; "
                              f"set `{ELEMENTWISE_FLAG} = True` on the class if it is element-wise, or use stage 0")
        raise ConfigError(f"optimizer.type: {row.name} computes statistics over whole tensors in step() and has "
                          f"no exact path on ZeRO stage {stage} partitions; use zero_optimization.stage 0")
    if precondition == "auto":
        return row.auto_precondition
    if precondition == "adam":
        if row.second_moment is None:
            raise ConfigError(f"agvm.precondition: 'adam' needs a base optimizer with a second-moment average of g²; "
                              f"{row.name} keeps none (use 'none' or 'auto')")
        for hp in row.no_precondition_if:
            if (params or {}).get(hp):
                raise ConfigError(f"agvm.precondition: 'adam' does not match {row.name} with {hp}=true (its "
                                  f"denominator is not √v + eps); use 'none' or {hp}: false")
        return "adam"
    return "none"


def build(row: OptimizerInfo, section: dict, param_groups: list[dict]):
    """Build the base optimizer from DeepSpeed's ``{"type": ..., "params": {...}}`` section."""
    cls = row.load()
    params = dict(section.get("params", {}) or {})
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    try:
        return cls(param_groups, **params)
    except TypeError as err:
        raise ConfigError(f"optimizer.params: {err}") from None


def _yes(flag: bool) -> str:
    return "yes" if flag else "—"


def markdown_table() -> str:
    """The docs/agvm.md "Base optimizers" table, generated from the rows."""
    lines = ["| `optimizer.type` | class | state per parameter | second moment (β2, eps) | "
             "whole-tensor step | ZeRO ≥ 1 | `auto` → | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for row in (*ROWS, FALLBACK):
        state = ", ".join([f"`{s}`" for s in row.state] + [f"`{s}` (if `{hp}`)" for hp, s in row.optional_state])
        moment = f"`{row.second_moment}` (`{row.beta2}`, `{row.eps}`)" if row.second_moment else "—"
        whole = "unknown" if row.whole_tensor is None else _yes(row.whole_tensor)
        zero = "if declared" if row.whole_tensor is None else \
            ("exact path" if row.whole_tensor and row.exact_partition else _yes(row.zero_safe()) if row.zero_safe()
             else "refused")
        target = f"`{row.target.replace(':', '.')}`" if row.target else "—"
        lines.append(f"| {row.name} | {target} | {state or '—'} | {moment} | {whole} | {zero} | "
                     f"{row.auto_precondition} | {row.note} |")
    return "\n".join(lines)
