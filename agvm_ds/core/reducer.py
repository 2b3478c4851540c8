"""Stream weighted local gradients straight to the ranks that own them.

``OwnerReducer`` builds, on each owner rank, ``acc += Σ_r coeff_r · grad_r`` over the
elements that rank owns (the adapters' ownership layout), without any rank ever holding a
full-size reduced copy: pieces are packed into one bucket per destination and each bucket
is summed onto its owner with ``dist.reduce``. Memory: one bucket plus the P/N accumulator.
Bytes sent: the gradient once (no padding, unlike a reduce-scatter of unequal shares).
The reductions are asynchronous (two buffer generations), so on GPUs and with gloo's
worker threads they overlap with the backward pass that feeds them.

Every rank must add the same parameters in the same order (tensor hooks fire in the same
order on every rank of a data-parallel job, and the boundary path walks a fixed list), so
the flush points — and therefore the collectives — line up across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class OwnerReducer:
    """Owner-partitioned weighted reduction of a stream of gradients (see module docstring).

    Buffers come in two generations: while one generation's reductions are in flight
    (``async_op``), ``add`` fills the other, so the sends overlap with the backward pass that
    produces the next gradients. Each generation holds ``bucket_size / 2`` elements split over
    the destinations, so both together stay within one bucket.
    """

    GENERATIONS = 2

    def __init__(self, layout: dict, rank: int, world: int, bucket_size: int, group=None):
        self.layout = layout
        self.rank = rank
        self.world = world
        self.group = group
        self.capacity = max(1, bucket_size // (max(world, 1) * self.GENERATIONS))
        self.acc: torch.Tensor | None = None
        self._bufs = [[None] * world for _ in range(self.GENERATIONS)]
        self._gen = 0
        self._fill = [0] * world
        self._pending: list[tuple[int, int, int]] = []  # (buf offset, acc offset, n) for my bucket
        self._in_flight: list = [None] * self.GENERATIONS  # (works, my buffer, pending) per generation

    def start(self, local_numel: int, device="cpu", zero: bool = True) -> None:
        make = torch.zeros if zero else torch.empty
        self.acc = make(local_numel, dtype=torch.float32, device=device)

    def release(self) -> None:
        self.wait()
        self.free_send_buffers()
        self.acc = None

    def free_send_buffers(self) -> None:
        """Drop the send buffers (after :meth:`wait`); they are re-made on the next stream."""
        assert not any(self._in_flight) and not any(self._fill), "free_send_buffers while sends are pending"
        self._bufs = [[None] * self.world for _ in range(self.GENERATIONS)]

    def buffer_bytes(self) -> int:
        """Bytes this reducer holds right now (accumulator and send buffers)."""
        held = 0 if self.acc is None else self.acc.numel() * self.acc.element_size()
        return held + sum(b.numel() * b.element_size() for gen in self._bufs for b in gen if b is not None)

    @torch.no_grad()
    def add(self, param: torch.Tensor, grad: torch.Tensor | None, coeff: float) -> None:
        flat = None if grad is None else grad.detach().reshape(-1)
        bufs = self._bufs[self._gen]
        for piece in self.layout[id(param)]:
            lo = piece.p_lo
            while lo < piece.p_hi:
                r = piece.rank
                room = self.capacity - self._fill[r]
                if room == 0:
                    self.flush()
                    bufs = self._bufs[self._gen]
                    continue
                n = min(room, piece.p_hi - lo)
                if bufs[r] is None:
                    bufs[r] = torch.empty(self.capacity, dtype=torch.float32,
                                          device=self.acc.device if self.acc is not None else "cpu")
                dst = bufs[r][self._fill[r]: self._fill[r] + n]
                if flat is None:
                    dst.zero_()
                elif flat.dtype == torch.float32:
                    torch.mul(flat[lo: lo + n], coeff, out=dst)
                else:
                    dst.copy_(flat[lo: lo + n]).mul_(coeff)
                if r == self.rank:
                    self._pending.append((self._fill[r], piece.acc_lo + (lo - piece.p_lo), n))
                self._fill[r] += n
                lo += n

    @torch.no_grad()
    def flush(self) -> None:
        """Start reducing the filled buffers (asynchronously) and switch generations; the
        generation switched to is completed first, so its buffers are free to refill."""
        if not any(self._fill):
            return
        works = []
        bufs = self._bufs[self._gen]
        for r in range(self.world):
            n = self._fill[r]
            if n and self.world > 1:
                works.append(dist.reduce(bufs[r][:n], dst=self._global_rank(r), op=dist.ReduceOp.SUM,
                                         group=self.group, async_op=True))
            self._fill[r] = 0
        self._in_flight[self._gen] = (works, bufs[self.rank], self._pending)
        self._pending = []
        self._gen = (self._gen + 1) % self.GENERATIONS
        self._complete(self._gen)

    def wait(self) -> None:
        """Send what is buffered and fold every finished reduction into ``acc``, in order."""
        self.flush()
        for k in range(1, self.GENERATIONS + 1):
            self._complete((self._gen + k) % self.GENERATIONS)

    def _complete(self, gen: int) -> None:
        item = self._in_flight[gen]
        if item is None:
            return
        works, mine, pending = item
        for w in works:
            w.wait()
        for off, acc_lo, k in pending:
            self.acc[acc_lo: acc_lo + k].add_(mine[off: off + k])
        self._in_flight[gen] = None

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)
