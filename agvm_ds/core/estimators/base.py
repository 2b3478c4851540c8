"""What the statistics controller asks of an estimator of the two gradient halves G1, G2.

AGVM compares two independent estimates of each module's gradient (paper §3). On an update
step every rank ends up holding, for the elements it owns, the averaged gradient ``G`` that
DeepSpeed reduced anyway plus one more vector ``S`` in the reducer's accumulator; an
estimator decides what ``S`` is and how it gets there, and so which linear map takes
(G, S) to the halves (:class:`~agvm_ds.core.statistics.Split`). Everything else — the
statistics pass, the all-reduce of the sums, μ, the non-finite skip — is the controller's
(:mod:`agvm_ds.core.controller`) and the same for every estimator.

The controller calls an estimator at four points of an update step, with this rank's
stage adapter (where the gradients live) and the owner-partitioned reducer (where ``S``
accumulates); every hook defaults to doing nothing, so an estimator implements only the
points where it acts:

* :meth:`Estimator.on_forward` — before a training forward pass, when
  :meth:`Estimator.wants_forward_hook` asked for one (gradient tensor hooks have to be
  armed before the backward that fires them);
* :meth:`Estimator.before_reduction` — ZeRO-0/1 only, on the accumulation boundary, just
  before DeepSpeed reduces the local gradients (the last moment they are still per rank);
* :meth:`Estimator.after_backward` — after every backward pass of an update step, after
  DeepSpeed's own reduction of that micro-step;
* :meth:`Estimator.end_accumulation` — on every accumulation boundary, update step or not,
  before the statistics pass.

Capability data tells the rest of the package what an estimate depends on without naming
the estimator: ``world_size_independent`` says whether the halves are the same however the
global batch is spread over ranks (what elastic resume needs, :mod:`agvm_ds.train.elastic`),
:meth:`Estimator.streams` whether it needs the reducer's stream buffers, and
:meth:`Estimator.half_samples` how many samples each half averages (what the gradient-noise
scale needs: the half-batch variance shrinks as 1/b, :mod:`agvm_ds.core.modulator`).
"""

from __future__ import annotations

from typing import ClassVar

from agvm_ds.core.statistics import Split


class Estimator:
    """One way of splitting the batch into two halves; built by ``build_estimator``.

    ``split`` is the (G, S) → (G1, G2) map this run uses; :meth:`coefficients` computes it
    for given half sizes (and refuses sizes that leave a half empty)."""

    #: The ``agvm.estimator`` value that selects this estimator.
    name: ClassVar[str]
    #: The halves do not depend on the number of ranks (same micro-batches per half).
    world_size_independent: ClassVar[bool]

    split: Split
    #: The run's shape, as ``build_estimator`` passed it, and the first half's share of it.
    accumulation: int
    world: int
    first_micro: int
    first_ranks: int

    def __init__(self, grad_accum: int, world_size: int, rank: int):
        self.accumulation, self.world = int(grad_accum), int(world_size)
        self.first_micro, self.first_ranks = self.accumulation // 2, self.world // 2
        self.split = self.coefficients(self.accumulation, self.first_micro, self.world, self.first_ranks)

    @staticmethod
    def coefficients(accumulation: int, first_micro: int, world: int, first_ranks: int) -> Split:
        """The (G, S) → halves map with ``first_micro`` of ``accumulation`` micro-batches and
        ``first_ranks`` of ``world`` ranks in the first half (each estimator reads the pair
        it splits by)."""
        raise NotImplementedError

    @staticmethod
    def sample_counts(accumulation: int, first_micro: int, world: int, first_ranks: int,
                      micro_batch: int) -> tuple[int, int]:
        """How many samples G1 and G2 each average, for the same half sizes as
        :meth:`coefficients` and ``micro_batch`` samples per micro-batch and rank."""
        raise NotImplementedError

    def half_samples(self, micro_batch: int) -> tuple[int, int]:
        """(b1, b2) of this run's halves with ``micro_batch`` samples per micro-batch."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        return self.sample_counts(self.accumulation, self.first_micro, self.world, self.first_ranks,
                                  int(micro_batch))

    def streams(self, reduces_every_micro_step: bool) -> bool:
        """Whether update steps send gradients through the reducer's fill and send buffers
        (memory beyond the P/N accumulator, which the partition report counts), given
        whether DeepSpeed reduces every micro-step (ZeRO-2/3)."""
        return True

    def wants_forward_hook(self, adapter) -> bool:
        """Whether the controller should call :meth:`on_forward` before forward passes."""
        return False

    def on_forward(self, adapter, reducer) -> None:
        """A training forward pass of an update step is about to run."""

    def before_reduction(self, adapter, reducer) -> None:
        """ZeRO-0/1, boundary of an update step: DeepSpeed is about to reduce the local sums."""

    def after_backward(self, adapter, reducer, micro_index: int, boundary: bool) -> None:
        """A backward pass of an update step has finished (``micro_index`` in [0, A))."""

    def end_accumulation(self) -> None:
        """An accumulation boundary: drop whatever the hooks armed for this step."""


def stream_local(adapter, reducer, coeff: float) -> None:
    """Stream ``coeff`` × every parameter's local, not yet reduced gradient to its owners
    (ZeRO-0/1, where DeepSpeed keeps per-rank running sums until the boundary)."""
    reducer.start(adapter.local_numel, adapter.device)
    for p in adapter.params:
        reducer.add(p, adapter.local_unreduced_grad(p), coeff)
    reducer.flush()  # completes by the boundary (reducer.wait in the statistics pass)
