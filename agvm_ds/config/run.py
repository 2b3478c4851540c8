"""Load one run file: DeepSpeed's sections plus validated ``agvm``, ``model``, ``data``, ``train``.

``load_run_config(path, overrides)`` reads the JSON, applies ``--override key.path=value``
(dotted path into the JSON, value JSON-parsed with a fallback to a plain string), drops
comment keys (any key starting with ``_``, at any depth), validates the four agvm-ds
sections with pydantic (``extra="forbid"``), checks DeepSpeed's batch keys, runs the one
preflight (:mod:`agvm_ds.config.preflight`: the allow-list over DeepSpeed's schema, DeepSpeed's
own parse, the support table, the estimator and the base optimizer), imports the package of
every enabled DeepSpeed monitor (:func:`check_monitors`), then runs
the checks across sections in :mod:`agvm_ds.config.checks` (no NaN/infinity anywhere, the
base optimizer's own argument checks, what a given world size needs, AGVM that would never
act) — all before any distributed work, so a bad file fails in about a second. Checked
with a world size, a file passes here exactly when the launcher accepts it on that many
ranks (as far as the file alone decides: data on disk is read later).

Errors are :class:`agvm_ds.config.base.ConfigError` whose message names the file or the
dotted key. Every other top-level section goes to DeepSpeed unchanged.

Notes:
    ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps *
    world_size`` is checked (and missing keys are filled in) when the world size is known:
    the ``world_size`` argument, else the ``WORLD_SIZE`` variable the launchers set. Without
    one, only divisibility is checked and the implied world size is recorded.

Limitations:
    DeepSpeed ignores top-level keys it does not know. A key that is a near miss of a known
    section (``zero_optimisation``) is an error here; any other unknown key only warns
    (:func:`agvm_ds.zero.schema.check_keys`).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.config.base import parse_section
from agvm_ds.errors import ConfigError
from agvm_ds.config.checks import check_finite, run_checks
from agvm_ds.config.data import DataConfig
from agvm_ds.config.files import OWN_SECTIONS, apply_override, read_json, strip_comments
from agvm_ds.config.model import ModelConfig
from agvm_ds.config.preflight import Preflight, preflight
from agvm_ds.config.train import TrainConfig
from agvm_ds.zero.settings import resolve_batch, zero_stage

@dataclass(frozen=True)
class RunConfig:
    """A validated run file: the typed root. Built once by :func:`load_run_config` and never
    changed afterwards — what a run derives from it (steps, lr, AGVM's start step, monitor
    paths) is :func:`agvm_ds.train.resolve.resolve_run`'s output, not an edit of this.

    ``deepspeed`` holds DeepSpeed's sections (comments removed, batch keys completed)."""

    path: Path
    name: str
    deepspeed: dict[str, Any]
    agvm: AGVMConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    world_size: Optional[int] = None
    warnings: list[str] = field(default_factory=list)
    #: what the preflight decided (agvm_ds.config.preflight): the parsed DeepSpeed setting,
    #: the base optimizer's registry row and preconditioning
    preflight: Optional[Preflight] = None

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])

    @property
    def global_batch(self) -> int:
        return int(self.deepspeed["train_batch_size"])

    @property
    def zero_stage(self) -> int:
        return self.preflight.stage if self.preflight is not None else zero_stage(self.deepspeed)


#: DeepSpeed monitor section -> (the modules DeepSpeed 0.19 imports for it, the pip extra,
#: the minimum version DeepSpeed checks or None); csv_monitor needs nothing beyond DeepSpeed
MONITOR_PACKAGES = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard", None),
    "wandb": (("wandb",), "wandb", None),
    "comet": (("comet_ml",), "comet", "3.41.0"),
}


def _enabled(value: Any) -> bool:
    """A monitor's ``enabled`` as DeepSpeed's pydantic model reads it (``"false"`` is off)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on", "t", "y")
    return bool(value)


def check_monitors(ds: dict) -> None:
    """Import the package of every enabled monitor, so a missing one is refused here, with
    the pip extra that installs it, instead of crashing rank 0 inside ``deepspeed.initialize``
    (and the other ranks in the next collective)."""
    for key, (modules, extra, min_version) in MONITOR_PACKAGES.items():
        section = ds.get(key)
        if not isinstance(section, dict) or not _enabled(section.get("enabled")):
            continue
        for module in modules:
            try:
                imported = importlib.import_module(module)
            except Exception as err:  # noqa: BLE001 - a broken install is as unusable as none
                why = " ".join(str(err).split()) or type(err).__name__
                raise ConfigError(f"{key}.enabled: the {key} monitor needs the {modules[0]!r} package, which "
                                  f"does not import ({why}); install it with pip install 'agvm-ds[{extra}]' "
                                  f"(from a checkout: pip install -e '.[{extra}]')") from None
            if min_version is not None and module == modules[0]:
                from packaging.version import InvalidVersion, Version

                have = str(getattr(imported, "__version__", "0"))
                try:
                    too_old = Version(have) < Version(min_version)
                except InvalidVersion:  # a local build with a free-form version: let it try
                    too_old = False
                if too_old:
                    raise ConfigError(f"{key}.enabled: the {key} monitor needs {modules[0]} >= {min_version}, "
                                      f"found {have}; pip install 'agvm-ds[{extra}]'")


def _check_launcher_rules(ds: dict, train: TrainConfig) -> None:
    """What the launcher adds to the preflight: a learning rate unless ``train.lr_scaling``
    picks one, the schedule and the clipping owned by the ``train`` section."""
    opt = ds.get("optimizer")
    params = opt.get("params", {}) if isinstance(opt, dict) else {}
    lr = params.get("lr") if isinstance(params, dict) else None
    if isinstance(opt, dict) and isinstance(params, dict) and train.lr_scaling is None and (
            isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"optimizer.params.lr: must be a positive number (or set "
                          f"train.lr_scaling), got {lr!r}")
    if "scheduler" in ds:
        raise ConfigError("scheduler: the launcher schedules the lr from the train section "
                          "(train.warmup*, train.decay); remove the DeepSpeed scheduler")
    if train.grad_clip is not None and ds.get("gradient_clipping", 0.0) not in (0, 0.0):
        raise ConfigError("gradient_clipping: train.grad_clip owns clipping; set one of "
                          "gradient_clipping and train.grad_clip, not both")


def check_model_builder(model: ModelConfig, data: DataConfig, import_code: bool) -> list[str]:
    """The network's task against ``data.task``; a user's ``package.module:function`` builder
    is imported only with ``import_code`` (the training launcher), else reported as not
    checked — a file must not run code by being checked (the rule of ``optimizer.type``)."""
    from agvm_ds import families

    task = model.task
    if task is not None and not families.task_fits(task, data.task):
        raise ConfigError(f"model: {model.builder or model.spec} predicts {task}, which does not train on "
                          f"data.task {data.task!r}")
    if model.builder_kind != "user":
        return []
    if import_code:
        families.import_target(model.builder, "model.builder")
        return []
    return [f"model.builder {model.builder!r}: not checked: custom builder (imported only by the training "
            "launcher or the Python API, which check it then)"]


def validate_run_dict(raw: dict, path: Path, world_size: Optional[int] = None, import_code: bool = False) -> RunConfig:
    """Validate an already-read (and overridden) run dict. See :func:`load_run_config`."""
    raw = strip_comments(raw)
    check_finite(raw)  # NaN / infinity anywhere, DeepSpeed's sections included
    for sec in OWN_SECTIONS:
        if sec in raw and raw[sec] is not None and not isinstance(raw[sec], dict):
            raise ConfigError(f"{sec}: must be an object")
    if "model" not in raw:
        raise ConfigError("model: missing section")
    train = parse_section(TrainConfig, raw.get("train"), "train")
    agvm = parse_section(AGVMConfig, raw.get("agvm"), "agvm")
    model = parse_section(ModelConfig, raw.get("model"), "model")
    data = parse_section(DataConfig, raw.get("data"), "data")
    ds = {k: v for k, v in raw.items() if k not in OWN_SECTIONS}
    _check_launcher_rules(ds, train)
    ws = resolve_batch(ds, world_size)
    # Exact or refused, once: the allow-list, DeepSpeed's own parse, the estimator's split at
    # this world size, the support table and the base optimizer (agvm_ds.config.preflight)
    checked = preflight(ds, agvm, ws if world_size is not None else None, import_code=import_code)
    check_monitors(ds)
    warnings = list(checked.warnings) + check_model_builder(model, data, import_code)
    run = RunConfig(path=path, name=path.stem, deepspeed=ds, agvm=agvm, model=model,
                    data=data, train=train, world_size=ws, warnings=warnings, preflight=checked)
    # the checks across sections, the world size and the base optimizer (config/checks.py)
    warnings.extend(run_checks(run))
    return run


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None,
                    world_size: Optional[int] = None, import_code: bool = False) -> RunConfig:
    """Read, override and validate one run file; raise :class:`ConfigError` on any mistake.

    Args:
        path: the JSON run file.
        overrides: ``key.path=value`` strings, applied in order.
        world_size: data-parallel ranks; default ``$WORLD_SIZE`` when set.
        import_code: import a base optimizer named by a module path to check it (the
            training launcher); False (checking a file, evaluating, exporting) never runs
            code a file names — such a class is reported as not checked.
    """
    path = Path(path)
    raw = read_json(path)
    for text in overrides or []:
        apply_override(raw, text)
    if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world_size = int(os.environ["WORLD_SIZE"])
    return validate_run_dict(raw, path, world_size, import_code)


def main(argv: list[str] | None = None) -> int:
    """``python -m agvm_ds.config.run FILE [--override k=v …] [--world_size N]``: check a file."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("file")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--world_size", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.file, args.override, args.world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.file}: ok (train_batch_size {run.deepspeed.get('train_batch_size', '?')}, "
          f"world size {run.world_size if run.world_size is not None else 'unspecified'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
