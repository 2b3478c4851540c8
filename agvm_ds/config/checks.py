"""Checks of a whole run file that no single section's model can make on its own.

Each section is validated by its pydantic model (bounds, finite floats, unknown keys);
what needs two sections, the world size or the base optimizer's own rules is here, in
one place that :func:`agvm_ds.config.run.validate_run_dict` calls after the sections are
parsed (and the launcher, through it, before any heavy work):

* :func:`check_finite` — no NaN or infinity anywhere in the file, DeepSpeed's sections
  included (Python's JSON reader accepts them; JSON itself has none);
* :func:`check_optimizer_params` — the base optimizer is built once on a dummy tensor, so
  a value its constructor refuses (``betas: [0.9, 1.5]``, a negative ``lr``) is an
  ``optimizer.params`` error here, not a traceback after the data and the model are built;
  with Adam-preconditioned halves its β2 must lie in (0, 1) (called by the one preflight,
  :mod:`agvm_ds.config.preflight`, so ``initialize`` makes it too);
* :func:`check_world` — what the launcher refuses for a given number of ranks: the AGVM
  estimator that can split the run (:func:`agvm_ds.zero.settings.choose_estimator`), a
  synthetic training set smaller than one global batch, a class count the embedded
  benchmark does not have;
* :func:`agvm_inactive` — a run whose AGVM would never scale a learning rate
  (``agvm.start_step`` at or beyond the last step, or a warmup as long as the run): a
  ``warning:`` from the config check when the file fixes the run's length, and from the
  launcher (:func:`agvm_ds.train.resolve.resolve_run`) once the steps are known.

:func:`run_checks` runs the last two on a validated :class:`~agvm_ds.config.run.RunConfig`
and returns its warnings; each refusal is a :class:`~agvm_ds.config.base.ConfigError` naming
the key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.zero.settings import choose_estimator
from agvm_ds.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from agvm_ds.config.run import RunConfig

__all__ = ["SYNTHETIC_CLASSES", "agvm_inactive", "check_finite", "check_optimizer_params", "check_world",
           "run_checks"]

#: classes of the embedded shapes benchmark (``agvm_ds.data.shapes.SHAPE_NAMES``; semantic
#: segmentation adds the background); a test keeps the two equal
SYNTHETIC_CLASSES = 6


def check_finite(node: Any, where: str = "") -> None:
    """Refuse NaN and infinity anywhere in ``node`` (a run dict), naming the dotted key."""
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where or 'the file'}: must be a finite number, got {node!r}")
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_finite(value, f"{where}.{i}" if where else str(i))


def check_optimizer_params(section: dict, agvm: AGVMConfig, stage: int) -> None:
    """Build the base optimizer of ``section`` (DeepSpeed's ``optimizer``) on one dummy
    tensor, so its own argument checks run now; then check what AGVM's preconditioning
    needs of it. A class that cannot even be imported is the registry's error (already
    raised by the caller); anything but a ``ValueError``/``TypeError`` from the
    constructor is left for the real build."""
    import torch

    from agvm_ds.optim import registry

    row = registry.find(section["type"])
    params = dict(section.get("params") or {})
    params.setdefault("lr", 1e-3)  # train.lr_scaling picks it later
    dummy = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        built = registry.build(row, {**section, "params": params}, [{"params": [dummy]}])
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer.params: {err}") from None
    except Exception:  # noqa: BLE001 - not a value problem: the real build reports it
        return
    mode = registry.check(row, section.get("params"), stage, agvm.precondition if agvm.enabled else "none")
    if mode == "adam":
        beta2 = row.beta2_of(built.param_groups[0])
        if not 0.0 < beta2 < 1.0:
            key = row.beta2.partition("[")[0]
            raise ConfigError(f"optimizer.params.{key}: AGVM's Adam-preconditioned halves (agvm.precondition "
                              f"{agvm.precondition!r} with {row.name}) need beta2 in (0, 1), got {beta2!r}; "
                              f"set agvm.precondition: \"none\" to measure raw gradients")


def check_world(run: "RunConfig") -> None:
    """Refuse what the launcher would refuse for ``run.world_size`` ranks (skipped while
    the world size is unknown)."""
    data = run.data
    if data.root is None:
        want = SYNTHETIC_CLASSES + (1 if data.task == "semantic" else 0)
        if data.task == "semantic" and data.semantic_classes is not None:
            want = data.semantic_classes  # the dataset takes the count it is given
        if run.model.num_classes != want:
            raise ConfigError(f"model.num_classes: {run.model.num_classes} but the embedded benchmark "
                              f"(data.root: null, task {data.task!r}) has {want} classes")
    if run.world_size is None:
        return
    if run.agvm.enabled:
        try:
            choose_estimator(run.agvm.estimator, run.grad_accum, run.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if data.root is None and data.synthetic.train < run.global_batch:
        raise ConfigError(f"data.synthetic.train: {data.synthetic.train} training images are fewer than one "
                          f"global batch (train_batch_size {run.global_batch} on {run.world_size} rank(s))")


def agvm_inactive(agvm: AGVMConfig, total_steps: int, start_step: int, from_warmup: bool) -> Optional[str]:
    """The warning for a run whose AGVM never acts, or None. ``start_step`` is the first
    step AGVM scales (0-based), ``from_warmup`` whether it came from the end of warmup
    (``agvm.start_step`` unset) rather than from ``agvm.start_step``."""
    if not agvm.enabled or start_step < total_steps:
        return None
    if from_warmup:
        return (f"train.warmup_steps: AGVM starts at the end of warmup, step {start_step}, but the run has "
                f"{total_steps} steps (0..{total_steps - 1}): AGVM would never act; shorten the warmup, set "
                f"agvm.start_step below {total_steps}, or set agvm.enabled: false")
    return (f"agvm.start_step: {start_step}, but the run has {total_steps} steps (0..{total_steps - 1}): AGVM "
            f"would never act; set agvm.start_step below {total_steps} (null: the end of warmup), or set "
            f"agvm.enabled: false")


def _static_inactive(run: "RunConfig") -> Optional[str]:
    """:func:`agvm_inactive` when the file alone fixes the run's length and AGVM's start."""
    train = run.train
    if train.max_steps is None:
        return None  # epochs: the steps depend on the dataset (the launcher checks)
    if run.agvm.start_step is not None:
        return agvm_inactive(run.agvm, train.max_steps, run.agvm.start_step, from_warmup=False)
    if train.warmup_epochs is not None:
        return None
    return agvm_inactive(run.agvm, train.max_steps, min(train.warmup_steps or 0, train.max_steps),
                         from_warmup=True)


def run_checks(run: "RunConfig") -> list[str]:
    """Every check above on a validated run; return the warnings (refusals raise)."""
    check_world(run)
    warning = _static_inactive(run)
    return [warning] if warning else []
