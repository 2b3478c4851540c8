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
this class only holds μ through a shared :class:`~agvm_ds.core.modulator.Modulator`. Which
step μ applies to, and whether a step is skipped (a non-finite gradient on any rank), is
the business of the controller :meth:`AGVM.attach` hands the optimizer to: every step
asks it (:class:`StepController`), so the decision can wait until the step's first call,
when DeepSpeed has just all-reduced the gradient norm (see
:meth:`~agvm_ds.core.adapters.StageAdapter.engine_nonfinite_check`). Used on its own,
without a controller, AGVM never skips and applies μ at ``step_index``, which the caller
advances.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Protocol

import torch

from agvm_ds.core.modulator import Modulator
from agvm_ds.optim import registry


class StepController(Protocol):
    """What :meth:`AGVM.step` asks the controller it is attached to."""

    @property
    def step_index(self) -> int:
        """The optimizer step μ applies to."""

    def skip_step(self) -> bool:
        """Whether this step must be a no-op (asked on every call of the step)."""


class AGVM(torch.optim.Optimizer):
    """Wraps ``base``; every param group must carry a ``"module"`` key naming its module.

    A real torch optimizer: ``register_step_pre_hook`` / ``register_step_post_hook`` fire
    around every ``step()`` call (per group / sub-group under ZeRO), the state-dict hooks
    around ``state_dict`` / ``load_state_dict`` (which hold the base's state), and
    ``add_param_group`` adds to the base (module key required; refused once a statistics
    controller has taken the groups, since a new group would be modulated unmeasured)."""

    def __init__(self, base: torch.optim.Optimizer, modulator: Modulator):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        for i, g in enumerate(base.param_groups):
            self._check_group(g, modulator, f"param group {i}")
        self.base = base
        self.modulator = modulator
        self.step_index = 0  # without a controller: the optimizer step μ applies to
        self.controller: Optional[StepController] = None
        self.groups_frozen = False  # set once a controller measures the groups
        # torch.optim.Optimizer.__init__ minus its two assignments: it would set
        # self.state / self.param_groups, which here *are* the base's (see the properties),
        # and re-add every group to the base. Everything else torch's machinery reads:
        self.defaults = base.defaults
        self._init_torch_hooks()

    def _init_torch_hooks(self):
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._patch_step_function()  # wraps AGVM.step once so the step hooks fire

    @staticmethod
    def _check_group(g: dict, modulator: Modulator, where: str):
        if "module" not in g:
            raise ValueError(f"{where} has no 'module' key (AGVM scales the lr per module)")
        if g["module"] not in modulator.modules:
            raise ValueError(f"{where} names unknown module {g['module']!r} (modules: {modulator.modules})")

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
        self._init_torch_hooks()

    def __repr__(self):
        return f"AGVM({self.base!r}, modules={self.modulator.modules})"

    def attach(self, controller: StepController) -> None:
        """Let ``controller`` decide each step's μ index and skip, and freeze the groups it
        measures (a group added later would be modulated unmeasured)."""
        self.controller = controller
        self.groups_frozen = True

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        if self.groups_frozen:
            raise ValueError("AGVM.add_param_group: the statistics controller already measures a fixed set of "
                             "groups; add every group before agvm_ds.initialize")
        self._check_group(param_group, self.modulator, "the new param group")
        self.base.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AGVM does not support a closure (DeepSpeed never passes one)")
        ctrl = self.controller
        if ctrl is not None and ctrl.skip_step():
            return None
        step = self.step_index if ctrl is None else ctrl.step_index
        saved = []
        for group in self.param_groups:
            saved.append(group["lr"])
            group["lr"] = group["lr"] * self.modulator.multiplier(group["module"], step)
        try:
            return self.base.step()
        finally:
            for group, lr in zip(self.param_groups, saved):
                group["lr"] = lr

    # The base's own state_dict / load_state_dict do the work (and fire the base's hooks);
    # AGVM's hooks, registered through torch's public API, run around them.
    def state_dict(self):
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = self.base.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            changed = hook(self, out)
            out = out if changed is None else changed
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        self.base.load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


# The registry (agvm_ds.optim.registry) decides; these names stay for existing callers.
def base_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Resolve the ``optimizer.type`` of a DeepSpeed JSON to a class through the registry
    (a registered name, any ``torch.optim`` class, or a dotted path)."""
    return registry.find(name).load()


def build_base_optimizer(section: dict, param_groups: list[dict]) -> torch.optim.Optimizer:
    """Build the base optimizer from DeepSpeed's ``{"type": ..., "params": {...}}`` section."""
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError("optimizer: the section needs a 'type' (e.g. \"SGD\" or \"AdamW\")")
    return registry.build(registry.find(str(section["type"])), section, param_groups)

