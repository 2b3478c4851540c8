"""The ``micro`` estimator: the halves are the first and the last micro-batches of a step.

With A = gradient_accumulation_steps, G1 is the mean gradient of the first a1 = ⌊A/2⌋
micro-batches (all ranks), G2 that of the last a2 = A − a1. ``S`` is the averaged running
sum after micro-step a1, so ``G1 = (A/a1)·S`` and ``G2 = A/(A−a1)·(G − S)``:

* ZeRO-2/3 already hold the reduced running sum after micro-step a1, so this rank copies
  its owned P/N elements (no extra traffic);
* ZeRO-0/1 reduce only at the boundary: their local running sums are streamed to the
  owners once (one extra reduction of P on update steps).

With an even A each half is half of every rank's micro-batches, so a run can resume on
another world size with the same global batch (the accumulation count absorbs the change)
and its halves keep their share of the batch; with an odd A the shares (⌊A/2⌋ : ⌈A/2⌉)
change with A, so elastic resume refuses it (agvm_ds/train/elastic.py). With A = 1 there are no halves to compare: ``build_estimator`` then uses the
``ranks`` split instead (N ≥ 2) or refuses to start (one rank).
"""

from __future__ import annotations

from agvm_ds.core.estimators.base import Estimator, stream_local
from agvm_ds.core.statistics import Split
from agvm_ds import mutations


class MicroEstimator(Estimator):
    name = "micro"
    world_size_independent = True

    @staticmethod
    def coefficients(accumulation: int, first_micro: int, world: int, first_ranks: int) -> Split:
        if not 0 < first_micro < accumulation:
            raise ValueError(f"micro split needs 0 < a1 < A, got a1={first_micro}, A={accumulation}")
        return Split(0.0, accumulation / first_micro, accumulation / (accumulation - first_micro),
                     -accumulation / (accumulation - first_micro))

    @staticmethod
    def sample_counts(accumulation: int, first_micro: int, world: int, first_ranks: int,
                      micro_batch: int) -> tuple[int, int]:
        """Each half holds its micro-batches from every rank: a1·m·N and (A − a1)·m·N
        samples (m per micro-batch)."""
        if not 0 < first_micro < accumulation:
            raise ValueError(f"micro split needs 0 < a1 < A, got a1={first_micro}, A={accumulation}")
        return first_micro * micro_batch * world, (accumulation - first_micro) * micro_batch * world

    def streams(self, reduces_every_micro_step: bool) -> bool:
        return not reduces_every_micro_step  # ZeRO-2/3 copy the reduced running sum instead

    def after_backward(self, adapter, reducer, micro_index: int, boundary: bool) -> None:
        """After micro-step a1: take ``S``, the running sum of the first half."""
        late = mutations.active("micro_late") and self.accumulation >= 3
        if boundary or micro_index != self.first_micro - 1 + late:
            return
        if adapter.reduces_every_micro_step:
            reducer.start(adapter.local_numel, adapter.device, zero=False)
            adapter.copy_owned_grad(reducer.acc)
        else:
            stream_local(adapter, reducer, 1.0 / self.world)
