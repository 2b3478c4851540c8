"""What a run derives from its validated run file, computed once: :func:`resolve_run`.

The run file (:class:`~agvm_ds.config.run.RunConfig`) says what the user wrote; a job also
needs values that depend on the dataset and the world: the number of steps and of warmup
steps, the learning rate after the batch-scaling rule, the step AGVM starts at (the end of
warmup unless ``agvm.start_step`` is set) and whether it comes before the last step (a
``warning:`` otherwise: AGVM would never act), the estimator that can split this run, and
where the DeepSpeed monitors write. They are
worked out here, into a new frozen :class:`ResolvedRun`; the run file itself is never
edited, so what ``config.json`` records is exactly what the job used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.errors import ConfigError
from agvm_ds.config.checks import agvm_inactive
from agvm_ds.config.run import RunConfig
from agvm_ds.core.estimators import Estimator, build_estimator
from agvm_ds.train.schedule import resolve_steps, scaled_lr

__all__ = ["ResolvedRun", "record_before_data", "resolve_run"]

#: DeepSpeed monitors that write files; enabled without ``output_path`` they write into the run.
FILE_MONITORS = ("tensorboard", "csv_monitor")


@dataclass(frozen=True)
class ResolvedRun:
    """The run file plus everything derived from it for one job."""

    run: RunConfig
    world: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    #: the ``agvm`` section with ``start_step`` filled in
    agvm: AGVMConfig
    #: DeepSpeed's sections for ``agvm_ds.initialize``: the lr and monitor paths filled in
    deepspeed: dict[str, Any]
    #: the estimator AGVM measures with on this world (None with AGVM off)
    estimator: Optional[Estimator] = None
    #: a line to log when the batch-scaling rule chose the lr, else None
    lr_note: Optional[str] = None
    #: ``warning:`` lines about the derived values (AGVM that would never act)
    warnings: tuple[str, ...] = ()

    @property
    def agvm_active(self) -> bool:
        """Whether AGVM scales a learning rate at some step of this run."""
        return self.estimator is not None and self.agvm.start_step < self.total_steps

    def record(self) -> dict[str, Any]:
        """The resolved run as JSON-able data (``config.json`` in the output dir)."""
        return {**_record(self.run, self.deepspeed, self.agvm),
                "_resolved": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                              "base_lr": self.base_lr, "world_size": self.world}}


def _record(run: RunConfig, deepspeed: dict[str, Any], agvm: AGVMConfig) -> dict[str, Any]:
    # The global and micro batch only: the accumulation count is derived again from the
    # world size that reloads the file (issue 25), as the elastic resume recommends.
    deepspeed = copy.deepcopy(deepspeed)
    deepspeed.pop("gradient_accumulation_steps", None)
    return {**deepspeed, "agvm": agvm.model_dump(mode="json"),
            "model": run.model.model_dump(mode="json"), "data": run.data.model_dump(mode="json"),
            "train": run.train.model_dump(mode="json")}


def record_before_data(run: RunConfig, out_dir: Path) -> dict[str, Any]:
    """What ``config.json`` will record for ``run`` in ``out_dir``, as far as it is known
    before the dataset is read (no ``_resolved``; ``agvm.start_step`` as configured, None
    when it follows the warmup): what a resume compares with the stored run
    (:mod:`agvm_ds.train.resume_policy`) before anything is built."""
    return _record(run, _deepspeed_sections(run, out_dir, _lr(run)[0]), run.agvm)


def _deepspeed_sections(run: RunConfig, out_dir: Path, lr: float) -> dict[str, Any]:
    """DeepSpeed's sections for the engine: the chosen lr, file monitors writing into the run."""
    ds = copy.deepcopy(run.deepspeed)
    ds["optimizer"].setdefault("params", {})["lr"] = lr
    for key in FILE_MONITORS:
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(out_dir / "monitor") + "/"
    return ds


def _lr(run: RunConfig) -> tuple[float, Optional[str]]:
    params = run.deepspeed["optimizer"].get("params", {})
    rule = run.train.lr_scaling
    if rule is None:
        return float(params["lr"]), None
    lr = scaled_lr(rule, run.global_batch)
    how = "linear" if rule.sqrt_above is None or run.global_batch <= rule.sqrt_above else "sqrt"
    sqrt = f", sqrt above {rule.sqrt_above}" if rule.sqrt_above else ""
    replaced = f"; replaces optimizer.params.lr={params['lr']}" if "lr" in params else ""
    note = (f"lr scaling ({how}): global batch {run.global_batch} -> lr {lr:.6g} "
            f"(base {rule.base_lr:g} per {rule.base_batch} images{sqrt}{replaced})")
    return lr, note


def resolve_run(run: RunConfig, out_dir: Path, world: int, dataset_len: int, rank: int = 0) -> ResolvedRun:
    """Steps, warmup, lr, AGVM's start step and estimator, and monitor paths of ``run`` on
    ``world`` ranks over a training set of ``dataset_len`` images; ``run`` is left as it is.

    Raises:
        ConfigError: the configured estimator cannot split this run (before any model work).
    """
    total, warmup = resolve_steps(run.train, dataset_len, run.global_batch)
    lr, note = _lr(run)
    ds = _deepspeed_sections(run, out_dir, lr)
    agvm = run.agvm
    if agvm.start_step is None:
        agvm = agvm.model_copy(update={"start_step": warmup})
    inactive = agvm_inactive(agvm, total, agvm.start_step, from_warmup=run.agvm.start_step is None)
    estimator = None
    if agvm.enabled:
        try:  # the engine chooses the same one from the same three numbers (agvm_ds.api)
            estimator = build_estimator(agvm, run.grad_accum, world, rank, announce=False)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return ResolvedRun(run=run, world=world, total_steps=total, warmup_steps=warmup, base_lr=lr,
                       agvm=agvm, deepspeed=ds, estimator=estimator, lr_note=note,
                       warnings=(inactive,) if inactive else ())
