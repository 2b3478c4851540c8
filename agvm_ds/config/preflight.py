"""One preflight: every refusal of a run's DeepSpeed sections, made once, before any engine.

:func:`preflight` is called by the launcher's config check
(:func:`agvm_ds.config.run.validate_run_dict`, also ``python -m agvm_ds.config.run``), by
``agvm_ds.initialize`` before ``deepspeed.initialize``, by ``bench/conformance.py`` to
classify its cells and (through ``initialize``) by the self-check. In order:

1. the allow-list (:func:`agvm_ds.zero.schema.check_keys`): an unknown key inside a known
   section, a near-miss top-level key, a non-default value of a key nobody measured;
2. DeepSpeed's own parse of the sections (:func:`agvm_ds.zero.settings.parse`) into one
   :class:`~agvm_ds.zero.settings.Setting` — what DeepSpeed would reject inside
   ``initialize`` is one line here;
3. the estimator's split at this world size (``agvm.estimator``);
4. the support table over combinations (:mod:`agvm_ds.zero.support`);
5. the ``scheduler`` section, which ``initialize`` hands to DeepSpeed;
6. the base optimizer against the registry at this ZeRO stage, with ``agvm.precondition``,
   and built once on a dummy tensor so its own argument checks run.

The result (:class:`Preflight`) is what the run keeps: the setting, the split, the base
optimizer's registry row and preconditioning, and the warnings to print once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.config.checks import check_optimizer_params
from agvm_ds.errors import ConfigError
from agvm_ds.optim import registry
from agvm_ds.zero import schema, support
from agvm_ds.zero.settings import Setting


@dataclass(frozen=True)
class Preflight:
    """What the preflight decided. ``optimizer``: the base optimizer's registry row (None
    where a read-only check left a custom class unimported);
    ``precondition``: ``"adam"`` when Φ is taken on Adam-preconditioned halves, else
    ``"none"``; ``warnings``: lines to print once (rank 0)."""

    setting: Setting
    optimizer: Any
    precondition: str
    warnings: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return self.setting.stage

    @property
    def estimator(self) -> str:
        return self.setting.estimator


def check_optimizer_section(opt: Any) -> dict:
    """The ``optimizer`` section, refused in one line unless it names a type and its params
    are an object."""
    if opt is None:
        raise ConfigError("optimizer: the section is required (it names AGVM's base optimizer)")
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise ConfigError("optimizer.type: name the base optimizer (e.g. \"SGD\" or \"AdamW\")")
    if not isinstance(opt.get("params", {}), dict):
        raise ConfigError("optimizer.params: must be an object")
    return opt


def check_scheduler_section(sched: Any) -> None:
    """A DeepSpeed ``scheduler`` section (``agvm_ds.initialize`` hands it to DeepSpeed): a
    ``type`` DeepSpeed has and ``params`` as an object, else one line naming the key."""
    if sched is None:
        return
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    if not isinstance(sched, dict):
        raise ConfigError(f"scheduler: must be an object, got {sched!r}")
    if sched.get("type") not in VALID_LR_SCHEDULES:
        raise ConfigError(f"scheduler.type: {sched.get('type')!r} is not one of DeepSpeed's schedulers "
                          f"({', '.join(VALID_LR_SCHEDULES)})")
    if not isinstance(sched.get("params", {}), dict):
        raise ConfigError("scheduler.params: must be an object")


def preflight(ds: dict, agvm: AGVMConfig, world: Optional[int], import_code: bool = True) -> Preflight:
    """Refuse (raise :class:`ConfigError`, one line naming the key) what AGVM cannot run
    exactly, or DeepSpeed would reject, for the DeepSpeed sections ``ds`` on ``world`` ranks
    (None: not known yet — the estimator's split is then checked at start-up).

    ``import_code`` False (a read-only check of a file): an ``optimizer.type`` that names a
    module path outside the registry is not imported — a file must not run code by being
    checked — and is reported as not checked (``optimizer`` None, ``precondition``
    ``"unchecked"``); the launcher and ``agvm_ds.initialize`` import and check it."""
    warnings = schema.check_keys(ds, agvm.enabled)
    opt = check_optimizer_section(ds.get("optimizer"))
    check_scheduler_section(ds.get("scheduler"))
    setting = Setting.read(ds, agvm.estimator, world, resolve=agvm.enabled)
    support.check(setting, agvm.enabled)
    if not import_code and registry.lookup(opt["type"]) is None and "." in opt["type"]:
        warnings.append(f"optimizer.type {opt['type']!r}: not checked: custom class (imported only by the training "
                        f"launcher or agvm_ds.initialize, which check it then)")
        return Preflight(setting=setting, optimizer=None, precondition="unchecked", warnings=warnings)
    row = registry.find(opt["type"])
    mode = registry.check(row, opt.get("params"), setting.stage, agvm.precondition if agvm.enabled else "none")
    check_optimizer_params(opt, agvm, setting.stage)  # its own argument checks, on a dummy tensor
    if agvm.enabled and (untested := support.version_warning()):
        warnings.append(untested)
    return Preflight(setting=setting, optimizer=row, precondition=mode, warnings=warnings)
