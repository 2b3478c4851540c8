"""Public API for people with their own DeepSpeed training loop.

``agvm_ds.initialize`` mirrors ``deepspeed.initialize``: it reads the ``agvm`` section of
the run config, resolves the module partition (from ``modules=`` or the model's
``agvm_modules`` metadata), builds the base optimizer named by the config's ``optimizer``
section, wraps it in :class:`~agvm_ds.core.optimizer.AGVM` and hands it to DeepSpeed as a
client optimizer; then it attaches the statistics controller to the engine. Checkpoints
written by ``engine.save_checkpoint`` carry μ and the modulator state (``client_state
["agvm"]``) and ``engine.load_checkpoint`` restores them; the engine loads checkpoint files
with ``torch.load(weights_only=True)`` and a short allow-list of DeepSpeed's classes
(:mod:`agvm_ds.checkpoint_engine`), never unpickling arbitrary objects.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict

import torch

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.config.base import ConfigError, parse_section
from agvm_ds.config.run import check_precision
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM
from agvm_ds.optim import registry
from agvm_ds.core.partition import (PartitionError, build_param_groups, groups_from_parameters,
                                    model_partition, resolve_partition)

#: Top-level sections agvm-ds owns; they are removed before the dict reaches DeepSpeed.
OWN_SECTIONS = ("agvm", "model", "data", "train")


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                return json.load(f)
        except OSError as err:
            raise ConfigError(f"{config}: cannot read config ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config}: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a dict or a path, got {type(config).__name__}")
    return copy.deepcopy(config)


def _strip_comments(obj):
    if isinstance(obj, dict):
        return {k: _strip_comments(v) for k, v in obj.items() if not str(k).startswith("_")}
    return obj


def initialize(model: torch.nn.Module, config, modules: dict | None = None, model_parameters=None,
               training_data=None, lr_scheduler=None, collate_fn=None, **kwargs):
    """``deepspeed.initialize`` with AGVM; returns ``(engine, optimizer, loader, scheduler)``.

    Args:
        model: the model; its ``agvm_modules`` / ``agvm_anchor`` give the default partition.
        config: the run config (dict or JSON path): DeepSpeed's sections plus ``agvm``. The
            ``optimizer`` section names the *base* optimizer: a row of
            :mod:`agvm_ds.optim.registry` (``SGD``, ``AdamW``, ``Lamb``, ``Lion`` …) or any
            torch optimizer class, refused under ZeRO ≥ 1 unless known to be exact there.
        modules: module name → parameter-name prefixes, anchor first unless ``agvm.anchor``.
        model_parameters: optional param groups; each is split per module and tagged.
    Raises:
        ConfigError: a bad ``agvm``/``optimizer`` section or partition (the message names the key).
    """
    import deepspeed

    cfg = _strip_comments(_load_config(config))
    agvm_cfg = parse_section(AGVMConfig, cfg.get("agvm"), "agvm")
    check_precision(cfg)  # DeepSpeed would refuse these only from deep inside initialize
    for key in OWN_SECTIONS:
        cfg.pop(key, None)
    opt_section = cfg.pop("optimizer", None)
    if opt_section is None:
        raise ConfigError("optimizer: the section is required (it names AGVM's base optimizer)")
    if not isinstance(opt_section, dict) or not isinstance(opt_section.get("type"), str):
        raise ConfigError("optimizer.type: name the base optimizer (e.g. \"SGD\" or \"AdamW\")")
    # Before any model or DeepSpeed work: a base that is wrong under this ZeRO stage, or a
    # preconditioning it cannot honour, is refused here (as the launcher's config check does).
    row = registry.find(opt_section["type"])
    mode = registry.check(row, opt_section.get("params"), registry.zero_stage(cfg),
                          agvm_cfg.precondition if agvm_cfg.enabled else "none")

    try:
        if modules is None:
            modules, anchor = model_partition(model)
        else:
            modules = OrderedDict(modules)
            anchor = next(iter(modules))
        if agvm_cfg.anchor is not None:
            if agvm_cfg.anchor not in modules:
                raise ConfigError(f"agvm.anchor: unknown module {agvm_cfg.anchor!r} (modules: {list(modules)})")
            anchor = agvm_cfg.anchor
        owner = resolve_partition(model, modules)
    except PartitionError as err:
        raise ConfigError(f"agvm modules: {err}") from None
    order = list(modules)
    if model_parameters is None:
        wd = opt_section.get("params", {}).get("weight_decay")
        groups = build_param_groups(model, owner, order, weight_decay=wd if wd else None)
    else:
        try:
            groups = groups_from_parameters(model, owner, list(model_parameters))
        except PartitionError as err:
            raise ConfigError(f"model_parameters: {err}") from None
    base = registry.build(row, opt_section, groups)

    start = agvm_cfg.start_step or 0
    modulator = Modulator(order, anchor, interval=agvm_cfg.interval, momentum=agvm_cfg.momentum,
                          start_step=start, clamp=tuple(agvm_cfg.clamp), eps=agvm_cfg.eps)
    precondition = row if mode == "adam" else None  # the row names the second moment, β2, eps

    optimizer = AGVM(base, modulator) if agvm_cfg.enabled else base
    group_params = [list(g["params"]) for g in base.param_groups]
    group_dicts = list(base.param_groups)
    cfg["zero_allow_untested_optimizer"] = True
    engine, opt, loader, sched = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg,
                                                      training_data=training_data, lr_scheduler=lr_scheduler,
                                                      collate_fn=collate_fn, **kwargs)
    from agvm_ds import checkpoint_engine

    checkpoint_engine.install(engine)  # engine.load_checkpoint never unpickles arbitrary objects
    from agvm_ds.optim.layerwise import attach_layerwise

    try:  # Lamb/Lars: whole-tensor norms over ZeRO's flat partitions (no-op for other bases)
        attach_layerwise(engine, base)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if agvm_cfg.enabled:
        from agvm_ds.core.controller import AGVMController

        try:
            controller = AGVMController(engine, optimizer, modulator, agvm_cfg, group_params, group_dicts,
                                        precondition)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        engine.agvm = controller
        _wrap_checkpointing(engine, controller)
    else:
        engine.agvm = None
    return engine, opt, loader, sched


def _wrap_checkpointing(engine, controller) -> None:
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state=None, *args, **kwargs):
        state = dict(client_state or {})
        state["agvm"] = controller.state_dict()
        return save(save_dir, tag, state, *args, **kwargs)

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        path, client_state = load(load_dir, tag, *args, **kwargs)
        if path is not None and client_state and "agvm" in client_state:
            controller.load_state_dict(client_state["agvm"])
        return path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def modulation(engine) -> dict:
    """``{"step", "modules": {name: {"cos", "phi", "mu"}}, "skipped"}`` of the last AGVM update."""
    ctrl = getattr(engine, "agvm", None)
    if ctrl is None:
        return {"step": -1, "modules": {}, "skipped": 0}
    out = ctrl.modulator.report()
    out["skipped"] = ctrl.modulator.skipped
    out["mu"] = dict(zip(ctrl.modulator.modules, ctrl.modulator.mu.tolist()))
    return out


def set_gradient_clipping(engine, max_norm: float) -> None:
    """Change DeepSpeed's global-norm clipping threshold at run time (0 disables it)."""
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    from agvm_ds.core.adapters import set_engine_gradient_clipping

    set_engine_gradient_clipping(engine, max_norm)
