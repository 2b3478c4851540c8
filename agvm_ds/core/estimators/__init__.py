"""The estimators of AGVM's two gradient halves, one class per file, chosen once per run.

:func:`build_estimator` builds the estimator the ``agvm.estimator`` name selects for the
accumulation count and the world size; the choice itself (``auto``; ``micro`` falling back
to the ``ranks`` split with one micro-batch per step on several ranks; the refusal, an
``agvm.estimator:`` message naming the fix, when nothing can split the run) is
:func:`agvm_ds.zero.settings.choose_estimator`'s, so the config check of a run file for a
given world size refuses exactly what the launcher and ``agvm_ds.initialize`` refuse.
The controller then only calls the object's hooks
(:class:`~agvm_ds.core.estimators.base.Estimator`). A new estimator is one new file, one
entry in :data:`ESTIMATORS` and its rule in ``choose_estimator``.
"""

from __future__ import annotations

import logging

from agvm_ds.config.agvm import AGVMConfig
from agvm_ds.zero.settings import choose_estimator
from agvm_ds.core.estimators.base import Estimator
from agvm_ds.core.estimators.micro import MicroEstimator
from agvm_ds.core.estimators.ranks import RanksEstimator
from agvm_ds.core.statistics import Split

__all__ = ["ESTIMATORS", "Estimator", "MicroEstimator", "RanksEstimator", "build_estimator",
           "split_coefficients"]

log = logging.getLogger("agvm_ds")

#: Every estimator by its ``agvm.estimator`` name.
ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in (MicroEstimator, RanksEstimator)}


def build_estimator(cfg: AGVMConfig, grad_accum: int, world_size: int, rank: int,
                    announce: bool = True) -> Estimator:
    """The estimator a run with ``grad_accum`` micro-batches per step on ``world_size`` ranks
    measures with.

    ``announce``: log the ``micro`` → ``ranks`` fallback on rank 0 (False where a caller
    only asks what the run would use, as elastic resume does).

    Raises:
        ValueError: the configured estimator cannot split this run (``agvm.estimator: …``).
    """
    name, fallback = choose_estimator(cfg.estimator, grad_accum, world_size)
    if fallback and announce and rank == 0:
        log.warning("agvm: gradient_accumulation_steps=1, so the 'micro' estimator splits by ranks")
    return ESTIMATORS[name](int(grad_accum), int(world_size), int(rank))


def split_coefficients(estimator: str, accumulation: int, first_micro: int, world: int, first_ranks: int) -> Split:
    """The linear map from (G, S) to the halves of the estimator named ``estimator``, for
    given half sizes (tests and benchmarks that check the statistics on their own)."""
    cls = ESTIMATORS.get(estimator)
    if cls is None:
        raise ValueError(f"unknown estimator {estimator!r}")
    return cls.coefficients(accumulation, first_micro, world, first_ranks)
