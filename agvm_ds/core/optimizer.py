"""AGVM as an optimizer: scales each param group's lr by its module's μ around a base step.

Adaptive Gradient Variance Modulator, Xue et al., "Large-batch Optimization for Dense
Visual Predictions", NeurIPS 2022 (Alg. 1 for SGD, Alg. 2 for AdamW).

For every step after the start step::

    for group in the groups DeepSpeed shows this call:
        group.lr <- scheduled lr × μ[group.module]
    base.step()
    restore every group's lr

``param_groups`` and ``state`` are the base optimizer's own objects, so DeepSpeed's
re-wiring (ZeRO-1/2 swap ``param_groups`` for a one-group list on each call; ZeRO-3 hands
over one sub-group at a time) reaches the base optimizer unchanged, and DeepSpeed's
schedulers, which write absolute lrs, never see μ. With SGD momentum / weight decay and
AdamW decoupled decay the scaled lr also scales the decay and the momentum update; that is
intended (paper §3, "Discussion on Momentum and Weight Decay").

The statistics that produce μ are measured elsewhere (:mod:`agvm_ds.core.controller`);
this class only holds μ through a shared :class:`~agvm_ds.core.modulator.Modulator` and a
step counter the controller advances. ``skip_next_step`` makes the next step a no-op on
every rank (set when a gradient was non-finite); ``None`` defers that decision to
``step_guard()``, asked on the step's first call, when DeepSpeed has just all-reduced the
gradient norm (see :meth:`~agvm_ds.core.adapters.StageAdapter.engine_nonfinite_check`).
"""

from __future__ import annotations

import inspect

import torch

from agvm_ds.core.modulator import Modulator


class AGVM(torch.optim.Optimizer):
    """Wraps ``base``; every param group must carry a ``"module"`` key naming its module."""

    def __init__(self, base: torch.optim.Optimizer, modulator: Modulator):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        for i, g in enumerate(base.param_groups):
            if "module" not in g:
                raise ValueError(f"param group {i} has no 'module' key")
            if g["module"] not in modulator.modules:
                raise ValueError(f"param group {i} names unknown module {g['module']!r}")
        # Deliberately no super().__init__: the wrapper owns no groups or state of its own.
        self.base = base
        self.modulator = modulator
        self.step_index = 0  # the optimizer step μ applies to (the engine's global step)
        self.skip_next_step: bool | None = False
        self.step_guard = None  # () -> bool, asked when skip_next_step is None
        self.skipped_steps = 0
        self.defaults = base.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # The base optimizer's groups and state *are* ours: DeepSpeed may assign either.
    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        return f"AGVM({self.base!r}, modules={self.modulator.modules})"

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        if "module" not in param_group:
            raise ValueError("an AGVM param group needs a 'module' key")
        self.base.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AGVM does not support a closure (DeepSpeed never passes one)")
        if self.skip_next_step is None:  # deferred: decided once per step, on the first call
            self.skip_next_step = bool(self.step_guard is not None and self.step_guard())
        if self.skip_next_step:
            return None
        saved = []
        for group in self.param_groups:
            saved.append(group["lr"])
            group["lr"] = group["lr"] * self.modulator.multiplier(group["module"], self.step_index)
        try:
            return self.base.step()
        finally:
            for group, lr in zip(self.param_groups, saved):
                group["lr"] = lr

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict)


def _timm_optimizers():
    import timm.optim as topt

    return {"lamb": topt.Lamb, "lars": topt.Lars, "lion": getattr(topt, "Lion", None)}


def base_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Resolve the ``optimizer.type`` of a DeepSpeed JSON to a class.

    Any ``torch.optim`` class by name (case-insensitive: ``SGD``, ``AdamW``, ``Adam`` …),
    ``Lamb`` / ``Lars`` from ``timm.optim``, or a dotted import path ``pkg.mod.Class``.
    """
    key = name.lower()
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == key and inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer):
            return obj
    timm_opts = _timm_optimizers()
    if timm_opts.get(key) is not None:
        return timm_opts[key]
    if "." in name:
        import importlib

        mod, _, cls = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"optimizer.type: cannot import {name!r} ({err})") from None
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer):
            return obj
    raise ValueError(f"optimizer.type: unknown optimizer {name!r} (a torch.optim class, Lamb, Lars, "
                     "or a dotted path to a torch.optim.Optimizer subclass)")


def build_base_optimizer(section: dict, param_groups: list[dict]) -> torch.optim.Optimizer:
    """Build the base optimizer from DeepSpeed's ``{"type": ..., "params": {...}}`` section."""
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError("optimizer: the section needs a 'type' (e.g. \"SGD\" or \"AdamW\")")
    cls = base_optimizer_class(str(section["type"]))
    params = dict(section.get("params", {}))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    try:
        return cls(param_groups, **params)
    except TypeError as err:
        raise ValueError(f"optimizer.params: {err}") from None


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the base keeps an Adam second moment ``exp_avg_sq`` with ``betas``."""
    return "betas" in optimizer.defaults
