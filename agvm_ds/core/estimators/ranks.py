"""The ``ranks`` estimator: the halves are the gradients of two halves of the ranks.

With N ranks, G1 is the mean over ranks [0, n1), G2 over [n1, N), n1 = ⌊N/2⌋ (the halves
differ by one rank when N is odd). Every rank streams ``c_r · g_r`` (c = +1/n1 or −1/n2)
to the owners, giving ``S = G1 − G2`` on each owner; then G1 = G + (n2/N)·S,
G2 = G − (n1/N)·S.

* Under ZeRO-2/3, and ZeRO-1 with ``overlap_comm`` (which reduces inside backward), the
  stream runs from tensor hooks during the update step's backward passes (one bucket +
  P/N memory): a forward pre-hook arms them, each backward ends with a flush of the last
  bucket, the boundary disarms them.
* Under ZeRO-0 and ZeRO-1 without overlap it runs from the local sums just before
  DeepSpeed's boundary reduction.

The stream goes out in ZeRO-shaped buckets (:mod:`agvm_ds.core.reducer`): one
reduce-scatter per bucket where the bucket's owners are all ranks in about equal shares,
else one reduce per owner the bucket touches — about P/bucket + N collectives and P
elements per micro-step, the bucket defaulting to ZeRO's ``reduce_bucket_size``. The
stream costs one extra gradient reduction per micro-step of an update step (fp32,
asynchronous, overlapping the backward pass).

The halves are made of ranks, so the estimate changes with the world size: such a run
cannot resume elastically. It needs at least two ranks.
"""

from __future__ import annotations

from agvm_ds.core.estimators.base import Estimator, stream_local
from agvm_ds.core.statistics import Split


class RanksEstimator(Estimator):
    name = "ranks"
    world_size_independent = False

    def __init__(self, grad_accum: int, world_size: int, rank: int):
        super().__init__(grad_accum, world_size, rank)
        n1 = self.first_ranks
        #: This rank's weight in the signed stream S = G1 − G2.
        self.coeff = (1.0 / n1) if rank < n1 else (-1.0 / (self.world - n1))
        self._hook_handles: list = []

    @staticmethod
    def coefficients(accumulation: int, first_micro: int, world: int, first_ranks: int) -> Split:
        if not 0 < first_ranks < world:
            raise ValueError(f"ranks split needs 0 < n1 < N, got n1={first_ranks}, N={world}")
        return Split(1.0, (world - first_ranks) / world, 1.0, -first_ranks / world)

    @staticmethod
    def sample_counts(accumulation: int, first_micro: int, world: int, first_ranks: int,
                      micro_batch: int) -> tuple[int, int]:
        """Each half holds every micro-batch of its ranks: n1·A·m and (N − n1)·A·m
        samples (m per micro-batch)."""
        if not 0 < first_ranks < world:
            raise ValueError(f"ranks split needs 0 < n1 < N, got n1={first_ranks}, N={world}")
        return first_ranks * accumulation * micro_batch, (world - first_ranks) * accumulation * micro_batch

    def wants_forward_hook(self, adapter) -> bool:
        # stream from hooks wherever the local sum is not readable at the boundary
        return not adapter.local_grad_at_boundary

    # -- ZeRO-2/3: stream from tensor hooks ------------------------------------------------
    def on_forward(self, adapter, reducer) -> None:
        if self._hook_handles:
            return
        reducer.start(adapter.local_numel, adapter.device)
        for p in adapter.params:
            self._hook_handles.append(p.register_hook(self._make_hook(reducer, p)))

    def _make_hook(self, reducer, p):
        def hook(grad):
            reducer.add(p, grad, self.coeff)
        return hook

    def after_backward(self, adapter, reducer, micro_index: int, boundary: bool) -> None:
        if self._hook_handles:
            reducer.flush()

    def end_accumulation(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    # -- ZeRO-0/1: stream the local sums -------------------------------------------------
    def before_reduction(self, adapter, reducer) -> None:
        stream_local(adapter, reducer, self.coeff)
