"""Public API for people with their own DeepSpeed training loop.

``agvm_ds.initialize`` mirrors ``deepspeed.initialize``, in small steps: it reads the run
config (:func:`read_config`; the ``agvm`` section is parsed once, or given typed), checks
the base optimizer against the registry, resolves the module partition
(:func:`build_partition`: ``modules=`` or the model's ``agvm_modules`` metadata), cuts the
param groups (:func:`build_param_groups`), builds the base optimizer named by the ``optimizer`` section and wraps it in
:class:`~agvm_ds.core.optimizer.AGVM` with its :class:`~agvm_ds.core.modulator.Modulator`, hands it
to DeepSpeed as a client optimizer, and attaches the statistics controller to the engine
(:func:`attach_agvm`). Checkpoints
written by ``engine.save_checkpoint`` carry μ and the modulator state (``client_state
["agvm"]``) and ``engine.load_checkpoint`` restores them; the engine loads checkpoint files
with ``torch.load(weights_only=True)`` and a short allow-list of DeepSpeed's classes
(:mod:`agvm_ds.checkpoint_engine`), never unpickling arbitrary objects.
"""

from __future__ import annotations

import copy
import logging
import os
import sys

import torch

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.config.base import parse_section
from agvm_ds.errors import ConfigError
from agvm_ds.config.checks import check_finite
from agvm_ds.config.files import OWN_SECTIONS, strip_comments
from agvm_ds.config.inherit import BASE_KEY, read_run_file
from agvm_ds.config.preflight import Preflight, check_optimizer_section, preflight
from agvm_ds.zero.settings import resolve_batch
from agvm_ds.core.modulator import Modulator
from agvm_ds.core.optimizer import AGVM
from agvm_ds.optim import registry
from agvm_ds.partition import (Partition, PartitionError, groups_from_parameters, param_groups,
                               resolve_partition)


def read_config(config) -> dict:
    """A run dict from a JSON path (its ``_base_`` chain resolved) or a dict (copied),
    comments (``_`` keys) removed — the same reader and comment rule as the launcher's
    (:mod:`agvm_ds.config.inherit`, :mod:`agvm_ds.config.files`)."""
    if isinstance(config, (str, os.PathLike)):
        return strip_comments(read_run_file(config))
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a dict or a path, got {type(config).__name__}")
    if BASE_KEY in config:  # a comment key otherwise: the bases would be dropped without a word
        raise ConfigError("_base_: a config dict has no file its bases are relative to; pass the run "
                          "file's path, or a dict from agvm_ds.config.inherit.read_run_file(path)")
    return strip_comments(copy.deepcopy(config))


def read_agvm_section(cfg: dict, agvm: AGVMConfig | None) -> AGVMConfig:
    """The typed ``agvm`` section: ``agvm`` as given (already validated), else the dict's
    ``agvm`` section parsed once. Both at once would be two sources of truth: refused."""
    if agvm is None:
        return parse_section(AGVMConfig, cfg.get("agvm"), "agvm")
    if not isinstance(agvm, AGVMConfig):
        raise ConfigError(f"agvm: expected an AGVMConfig, got {type(agvm).__name__}")
    if cfg.get("agvm") is not None:
        raise ConfigError("agvm: given both as the agvm= argument and as the config's agvm section")
    return agvm


def initialize(model: torch.nn.Module, config, modules: dict | Partition | None = None, model_parameters=None,
               training_data=None, lr_scheduler=None, collate_fn=None, *, agvm: AGVMConfig | None = None,
               norm_bias_decay: bool | None = None, **kwargs):
    """``deepspeed.initialize`` with AGVM; returns ``(engine, optimizer, loader, scheduler)``.

    Args:
        model: the model; its ``agvm_modules`` / ``agvm_anchor`` give the default partition,
            else :func:`agvm_ds.infer_partition` reads it from the model's structure
            (torchvision, detectron2, DETR, mmdetection layouts; a generic fallback).
        config: the run config (dict or JSON path): DeepSpeed's sections plus ``agvm``
            (keys starting with ``_`` are comments, as in run files). The
            ``optimizer`` section names the *base* optimizer: a row of
            :mod:`agvm_ds.optim.registry` (``SGD``, ``AdamW``, ``Lamb``, ``Lion`` …) or any
            torch optimizer class, refused under ZeRO ≥ 1 unless known to be exact there.
        modules: module name → parameter-name prefixes, anchor first unless ``agvm.anchor``;
            or a :class:`~agvm_ds.partition.Partition` already resolved, used as is (how the
            launcher keeps the partition it cut its groups from without resolving it again).
        model_parameters: optional param groups; each is split per module and tagged.
        norm_bias_decay: only without ``model_parameters``. False (the default, or the run
            file's ``train.norm_bias_decay``) exempts the parameters of norm layers, biases,
            other 1-d parameters and the position tables a model lists
            (``no_weight_decay()``) from ``optimizer.params.weight_decay``, detectron2 / timm
            style; True decays every parameter, exactly as ``deepspeed.initialize`` with the
            same JSON would. The run file's other launcher settings (``model``, ``data``, the
            rest of ``train``) are the launcher's: named in one ``warning:`` line and ignored.
        agvm: the typed ``agvm`` section (:class:`~agvm_ds.config.agvm.AGVMConfig`, already
            validated) instead of a section in ``config`` — how the launcher passes its
            resolved run without a dict round trip.
    Raises:
        ConfigError: a bad ``agvm``/``optimizer`` section or partition, or DeepSpeed settings
            AGVM cannot measure exactly (:mod:`agvm_ds.config.preflight`: a key of
            DeepSpeed's schema nobody measured, NVMe offload, ``gradient_allreduce_op: sum``,
            ZeRO-0 fp16 …) — one line naming the key, raised before ``deepspeed.initialize``
            builds anything.

    Note:
        DeepSpeed 0.19 clips the global gradient norm at 1.0 when ``gradient_clipping`` is
        omitted (measured: such a run equals SGD + ``clip_grad_norm_(1.0)``); write
        ``"gradient_clipping": 0.0`` for no clipping.
    """
    import deepspeed

    # Everything that can be refused is refused before DeepSpeed builds anything.
    cfg = read_config(config)
    check_finite(cfg)  # NaN / infinity anywhere (Python's JSON reader accepts them)
    agvm_cfg = read_agvm_section(cfg, agvm)
    norm_bias_decay = launcher_sections(cfg, norm_bias_decay)
    checked = check_deepspeed_support(cfg, agvm_cfg)
    opt_section = cfg.pop("optimizer", None)
    row = checked.optimizer
    precondition = row if checked.precondition == "adam" else None  # the row names the second moment, β2, eps
    partition = build_partition(model, modules, agvm_cfg)
    groups = build_param_groups(model, partition, opt_section, model_parameters, norm_bias_decay)
    base = registry.build(row, opt_section, groups)
    modulator = Modulator(list(partition.order), partition.anchor, interval=agvm_cfg.interval,
                          momentum=agvm_cfg.momentum, start_step=agvm_cfg.start_step or 0,
                          clamp=tuple(agvm_cfg.clamp), eps=agvm_cfg.eps)
    optimizer = AGVM(base, modulator) if agvm_cfg.enabled else base
    # the groups as built: ZeRO swaps each group's "params" for its flat partition
    measured = [(list(g["params"]), g) for g in base.param_groups]

    cfg["zero_allow_untested_optimizer"] = True
    # AGVM (or its base) is always a client optimizer: ZeRO-Offload then needs this off (the
    # support table refuses an explicit true under offload)
    cfg["zero_force_ds_cpu_optimizer"] = False
    flush_subnormals()  # process-wide, so only once nothing more is refused
    engine, opt, loader, sched = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg,
                                                      training_data=training_data, lr_scheduler=lr_scheduler,
                                                      collate_fn=collate_fn, **kwargs)
    attach_agvm(engine, base, optimizer, modulator, agvm_cfg, precondition, measured)
    return engine, opt, loader, sched


def check_deepspeed_support(cfg: dict, agvm_cfg: AGVMConfig) -> Preflight:
    """The one preflight (:mod:`agvm_ds.config.preflight`: the allow-list over DeepSpeed's
    schema, DeepSpeed's own parse, the estimator's split, the support table, the base
    optimizer) at the world size this process group has or the launcher announced
    (``WORLD_SIZE``), before DeepSpeed builds anything — the checks the launcher's config
    check makes. The accumulation count comes from the batch keys as DeepSpeed derives it;
    inconsistent batch keys are left to DeepSpeed's own check. Warnings are logged once."""
    from agvm_ds import collectives

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = collectives.world()
    else:
        env = os.environ.get("WORLD_SIZE", "")
        world = int(env) if env.isdigit() else 1
    check_optimizer_section(cfg.get("optimizer"))
    ds = copy.deepcopy(cfg)
    try:
        resolve_batch(ds, world)
    except ConfigError:
        ds.pop("gradient_accumulation_steps", None)  # DeepSpeed will refuse the batch keys itself
    checked = preflight(ds, agvm_cfg, world)
    if collectives.rank() == 0:
        for line in checked.warnings:
            logging.getLogger("agvm_ds").warning(line)
    return checked


def launcher_sections(cfg: dict, norm_bias_decay: bool | None) -> bool:
    """Pop the launcher's sections (``model``, ``data``, ``train``) from ``cfg``; return the
    ``norm_bias_decay`` that applies (the argument, else ``train.norm_bias_decay``, else
    False). The settings only the launcher can honour are named in one ``warning:`` line
    (rank 0); an unknown ``train`` key or two different ``norm_bias_decay`` are refused."""
    from agvm_ds.config.train import TrainConfig

    train = cfg.pop("train", None) or {}
    ignored = [key for key in ("model", "data") if cfg.pop(key, None) is not None]
    for key in OWN_SECTIONS:
        cfg.pop(key, None)
    if not isinstance(train, dict):
        raise ConfigError(f"train: expected an object, got {type(train).__name__}")
    unknown = sorted(set(train) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(f"train.{unknown[0]}: unknown key")
    from_file = train.get("norm_bias_decay")
    if from_file is not None and not isinstance(from_file, bool):
        raise ConfigError(f"train.norm_bias_decay: expected true or false, got {from_file!r}")
    if norm_bias_decay is not None and from_file is not None and norm_bias_decay != from_file:
        raise ConfigError(f"train.norm_bias_decay: {from_file} in the config but norm_bias_decay="
                          f"{norm_bias_decay} as the argument")
    ignored += [f"train.{k}" for k in train if k != "norm_bias_decay"]
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"warning: agvm_ds.initialize ignores {', '.join(ignored)} (launcher settings: "
              f"launch/train.py honours them; in your own loop the model, data and schedule are yours)",
              file=sys.stderr, flush=True)
    return bool(norm_bias_decay if norm_bias_decay is not None else from_file)


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero on CPU (``torch.set_flush_denormal``) unless
    ``AGVM_DS_FLUSH_DENORMAL=0``: on CPU they made whole detector training steps 4–7× slower
    without changing the losses (docs/benchmarks.md). True when flushing is on."""
    if os.environ.get("AGVM_DS_FLUSH_DENORMAL", "1") == "0":
        return False
    return bool(torch.set_flush_denormal(True))


def build_partition(model: torch.nn.Module, modules, agvm_cfg: AGVMConfig) -> Partition:
    """``modules`` (a dict, a :class:`Partition`, or None for the model's metadata) resolved
    against the model, with ``agvm.anchor`` applied."""
    try:
        partition = modules if isinstance(modules, Partition) else resolve_partition(model, modules)
    except PartitionError as err:
        raise ConfigError(f"agvm modules: {err}") from None
    if agvm_cfg.anchor is not None:
        try:
            partition = partition.with_anchor(agvm_cfg.anchor)
        except PartitionError as err:  # "anchor: unknown module ..." -> the key agvm.anchor
            raise ConfigError(f"agvm.{err}") from None
    if os.environ.get("RANK", "0") != "0":
        return partition
    inferred = partition.inferred
    if inferred is not None:
        cut = f"{', '.join(partition.order)} (anchor {partition.anchor}); pass modules= to choose others"
        if inferred.generic:
            inside = f" of {inferred.inside!r}" if inferred.inside else ""
            print(f"warning: agvm modules: no known layout fits {type(model).__name__}; the generic fallback "
                  f"(one module per top-level child{inside}) cut {cut}", file=sys.stderr, flush=True)
        else:
            print(f"[agvm-ds] agvm modules inferred ({partition.source}): {cut}", flush=True)
        for note in inferred.notes:  # strays joining the anchor, an anchor handed over
            print(f"[agvm-ds] agvm modules: {note}", flush=True)
    for line in partition.warnings:  # one module: AGVM would modulate nothing
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return partition


def build_param_groups(model: torch.nn.Module, partition: Partition, opt_section: dict, model_parameters,
                       norm_bias_decay: bool) -> list[dict]:
    """The base optimizer's groups, each inside one module: the user's ``model_parameters``
    split per module, or :func:`agvm_ds.partition.param_groups` with the JSON's weight decay."""
    if model_parameters is None:
        wd = opt_section.get("params", {}).get("weight_decay")
        return param_groups(model, partition, wd if wd else None, norm_bias_decay=norm_bias_decay)
    try:
        return groups_from_parameters(model, partition, list(model_parameters))
    except PartitionError as err:
        raise ConfigError(f"model_parameters: {err}") from None


def attach_agvm(engine, base, optimizer, modulator: Modulator, agvm_cfg: AGVMConfig, precondition,
                measured: list[tuple[list, dict]]) -> None:
    """After ``deepspeed.initialize``: the safe checkpoint engine, exact layer-wise norms
    for Lamb/Lars, and — with AGVM on — the estimator (chosen from the engine's accumulation
    count and data-parallel world) and the statistics controller behind its one seam;
    ``measured`` holds each group's parameters and dict as they were before ZeRO flattened
    them.
    μ and the modulator then travel in DeepSpeed's model-states file (``client_state
    ["agvm"]``) through the checkpoint engine; no engine method is replaced for it."""
    from agvm_ds import checkpoint_engine
    from agvm_ds.optim.layerwise import attach_layerwise

    checkpoint_engine.install(engine)  # engine.load_checkpoint never unpickles arbitrary objects
    try:  # Lamb/Lars: whole-tensor norms over ZeRO's flat partitions (no-op for other bases)
        attach_layerwise(engine, base)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not agvm_cfg.enabled:
        engine.agvm = None
        return
    from agvm_ds import collectives
    from agvm_ds.core.adapters import attach_controller
    from agvm_ds.core.controller import AGVMController
    from agvm_ds.core.estimators import build_estimator

    try:
        estimator = build_estimator(agvm_cfg, engine.gradient_accumulation_steps(), collectives.world(),
                                    collectives.rank())
        controller = AGVMController(engine, optimizer, modulator, agvm_cfg, [p for p, _ in measured],
                                    [g for _, g in measured], precondition, estimator)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    attach_controller(engine, controller)
    engine.checkpoint_engine.register("agvm", controller)


def modulation(engine) -> dict:
    """``{"step", "modules": {name: {"cos", "phi", "mu", "b_noise"}}, "b_noise", "skipped",
    "mu"}`` of the last AGVM update; ``b_noise`` (per module, and at the top level the whole
    model's) is the smoothed gradient-noise scale in samples, None while undefined
    (:mod:`agvm_ds.core.modulator`)."""
    ctrl = getattr(engine, "agvm", None)
    if ctrl is None:
        return {"step": -1, "modules": {}, "skipped": 0, "b_noise": None}
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
