"""Stream weighted local gradients straight to the ranks that own them.

``OwnerReducer`` builds, on each owner rank, ``acc += Σ_r coeff_r · grad_r`` over the
elements that rank owns (the adapters' ownership layout), without any rank ever holding a
full-size reduced copy: pieces are packed into one bucket per destination and each bucket
is summed onto its owner with ``dist.reduce``. Memory: one bucket plus the P/N accumulator.
Bytes sent: the gradient once (no padding, unlike a reduce-scatter of unequal shares).

Every rank must add the same parameters in the same order (tensor hooks fire in the same
order on every rank of a data-parallel job, and the boundary path walks a fixed list), so
the flush points — and therefore the collectives — line up across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class OwnerReducer:
    def __init__(self, layout: dict, rank: int, world: int, bucket_size: int, group=None):
        self.layout = layout
        self.rank = rank
        self.world = world
        self.group = group
        self.capacity = max(1, bucket_size // max(world, 1))
        self.acc: torch.Tensor | None = None
        self._bufs = [None] * world
        self._fill = [0] * world
        self._pending: list[tuple[int, int, int]] = []  # (buf offset, acc offset, n) for my bucket

    def start(self, local_numel: int, device="cpu") -> None:
        self.acc = torch.zeros(local_numel, dtype=torch.float32, device=device)

    def release(self) -> None:
        self.acc = None
        self._bufs = [None] * self.world

    @torch.no_grad()
    def add(self, param: torch.Tensor, grad: torch.Tensor | None, coeff: float) -> None:
        flat = None if grad is None else grad.detach().reshape(-1)
        for piece in self.layout[id(param)]:
            lo = piece.p_lo
            while lo < piece.p_hi:
                r = piece.rank
                room = self.capacity - self._fill[r]
                if room == 0:
                    self.flush()
                    continue
                n = min(room, piece.p_hi - lo)
                if self._bufs[r] is None:
                    self._bufs[r] = torch.zeros(self.capacity, dtype=torch.float32,
                                                device=self.acc.device if self.acc is not None else "cpu")
                dst = self._bufs[r][self._fill[r]: self._fill[r] + n]
                if flat is None:
                    dst.zero_()
                else:
                    torch.mul(flat[lo: lo + n], coeff, out=dst) if flat.dtype == torch.float32 \
                        else dst.copy_(flat[lo: lo + n]).mul_(coeff)
                if r == self.rank:
                    self._pending.append((self._fill[r], piece.acc_lo + (lo - piece.p_lo), n))
                self._fill[r] += n
                lo += n

    @torch.no_grad()
    def flush(self) -> None:
        for r in range(self.world):
            n = self._fill[r]
            if n == 0:
                continue
            buf = self._bufs[r][:n]
            if self.world > 1:
                dist.reduce(buf, dst=self._global_rank(r), op=dist.ReduceOp.SUM, group=self.group)
            if r == self.rank:
                for off, acc_lo, k in self._pending:
                    self.acc[acc_lo: acc_lo + k].add_(buf[off: off + k])
                self._pending.clear()
            self._fill[r] = 0

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)
