"""Stream weighted local gradients straight to the ranks that own them, in ZeRO-shaped buckets.

``OwnerReducer`` builds, on each owner rank, ``acc += Σ_r coeff_r · grad_r`` over the
elements that rank owns (the adapters' ownership layout), without any rank ever holding a
full-size reduced copy. The traffic has the shape of ZeRO's own gradient reduction:

* **The stream.** Every rank adds the same parameters in the same order (tensor hooks fire
  in the same order on every rank of a data-parallel job; the boundary path walks a fixed
  list). Their weighted gradients fill one *fill buffer* of ``fill_cap`` elements in that
  order; when it is full (and at the end of every backward) the bucket is closed and sent.
  A parameter that does not fit in the room left is cut: in element order, or — when its
  pieces are spread over at least half the ranks (the per-parameter even split of stages 0
  and 3) — across its pieces, an equal share from each, so buckets stay balanced.
* **One bucket, few collectives.** The closed bucket is packed rank-major into the *send
  buffer* and reduced by one of (the per-bucket rule, :meth:`OwnerReducer.flush`):

  - ``reduce_scatter_tensor`` — one collective — when the bucket intersects at least two
    owners and packing every owner's segment padded to the longest (``N · seg``) sends at
    most ``SCATTER_PAD`` times the bucket's real elements. That is the case wherever the
    owners of a bucket are all (or nearly all) ranks in about equal shares: stages 0/3,
    and ZeRO-1/2 buckets that cover every flat partition. DeepSpeed's ZeRO-3 packs its
    gradient buckets the same way (``reduce_scatter_coalesced``), in place as here;
  - otherwise one ``dist.reduce`` per intersected owner, of exactly that owner's elements:
    ZeRO-1/2's flat partitions are contiguous in parameter order, so a bucket smaller
    than the model touches one or two owners.

  Per micro-step that is one collective per bucket where the owners are all ranks, and
  about ``P / fill_cap + N`` per param group at most otherwise (each owner boundary adds
  one reduce; ZeRO-1/2 partition every group over all ranks), and about ``P`` elements
  (≤ ``SCATTER_PAD`` · P). With the controller's default bucket (ZeRO's own
  ``reduce_bucket_size``) the count is ZeRO's own (bench/comm_scale.py).
* **Overlap.** Sends are asynchronous: while one bucket is in flight from the send buffer,
  the next one fills the fill buffer; closing a bucket first completes the previous one
  (and folds this rank's share into ``acc``), so at most one bucket is in flight.
* **Memory.** ``acc`` (P/N fp32) plus the two buffers, which share ``bucket_size``:
  ``fill_cap = bucket_size / (1 + SCATTER_PAD)`` (capped at the streamed P), the send
  buffer ``SCATTER_PAD · fill_cap`` (room for the padding).

Every buffer lives on ``acc``'s device (the accelerator's: NCCL takes only device tensors).
gloo in torch 2.13 runs ``reduce_scatter_tensor`` on CPU tensors, in place included (tested),
so the tests exercise the path NCCL takes; ``scatter=False`` forces per-owner reduces for a
backend without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

#: A bucket is reduce-scattered only if the padded rank-major packing is at most this many
#: times its real elements (the rest of a row is zeros); the send buffer has this much room.
SCATTER_PAD = 1.25


def default_bucket_size(reduce_bucket_size: int, largest_param: int) -> int:
    """``agvm.bucket_size`` when unset: room for one of ZeRO's reduction buckets filling while
    the previous one is in flight (send buffer ``SCATTER_PAD`` × the fill), so AGVM's buckets
    — and its collectives per micro-step — are ZeRO's own. ZeRO's bucket always takes a whole
    parameter, however large: so does AGVM's."""
    return int((1.0 + SCATTER_PAD) * max(int(reduce_bucket_size), int(largest_param))) + 1


def buffer_elements(bucket_size: int, streamed: int) -> int:
    """fp32 elements of the fill and send buffers for a stream of ``streamed`` elements."""
    fill = max(1, min(int(bucket_size / (1.0 + SCATTER_PAD)), streamed))
    return fill + int(SCATTER_PAD * fill)


@dataclass(frozen=True)
class Block:
    """``m`` equal pieces of one parameter owned by consecutive ranks: row ``i`` is elements
    ``[p_lo + i·width, p_lo + (i+1)·width)``, owned by rank ``r0 + i``."""

    r0: int
    m: int
    p_lo: int
    width: int
    mine: int | None  # offset in this rank's local layout of its row (None: not an owner)


def blocks_of(pieces, rank: int) -> list[Block]:
    """Group a parameter's layout pieces into blocks (the even split is one or two blocks), so
    the stream moves a parameter with a few strided copies instead of one per owner."""
    out, i = [], 0
    while i < len(pieces):
        first = pieces[i]
        width = first.p_hi - first.p_lo
        j = i + 1
        while (j < len(pieces) and pieces[j].rank == first.rank + (j - i)
               and pieces[j].p_lo == pieces[j - 1].p_hi and pieces[j].p_hi - pieces[j].p_lo == width):
            j += 1
        mine = next((pc.acc_lo for pc in pieces[i:j] if pc.rank == rank), None)
        out.append(Block(first.rank, j - i, first.p_lo, width, mine))
        i = j
    return out


class OwnerReducer:
    """Owner-partitioned weighted reduction of a stream of gradients (see module docstring).

    ``calls`` counts the collectives issued by kind and ``sent_elements`` the elements handed
    to them (inputs, padding included), for tests and benchmarks. ``comm`` is the
    ``torch.distributed`` module, or a stand-in with the same calls for counting.
    """

    def __init__(self, layout: dict, rank: int, world: int, bucket_size: int, group=None,
                 scatter: bool = True, comm=dist):
        self.layout = layout
        self.rank = rank
        self.world = world
        self.group = group
        self.scatter = scatter
        self.comm = comm
        total = sum(pc.p_hi - pc.p_lo for pieces in layout.values() for pc in pieces)
        self.fill_cap = max(1, min(int(bucket_size / (1.0 + SCATTER_PAD)), total))
        self.send_cap = int(SCATTER_PAD * self.fill_cap)
        self.acc: torch.Tensor | None = None
        self._blocks: dict[int, list[Block]] = {}
        self._fill_buf: torch.Tensor | None = None
        self._send_buf: torch.Tensor | None = None
        self._reset_bucket()
        self._in_flight = None  # (works, this rank's result row, its (pos, acc_lo, n) pieces)
        self.calls = {"reduce": 0, "reduce_scatter": 0}
        self.sent_elements = 0

    def _reset_bucket(self) -> None:
        self._fill = 0                       # real elements in the fill buffer
        self._cursor = [0] * self.world      # each owner's row length so far (gaps included)
        self._slabs: list[tuple[int, int, int, int, int]] = []  # (r0, rows, fill offset, width, row pos)
        self._mine: list[tuple[int, int, int]] = []             # (row pos, acc offset, n) of this rank

    # -- lifetime ----------------------------------------------------------------------
    def start(self, local_numel: int, device="cpu", zero: bool = True) -> None:
        make = torch.zeros if zero else torch.empty
        self.acc = make(local_numel, dtype=torch.float32, device=device)

    def release(self) -> None:
        self.wait()
        self.free_send_buffers()
        self.acc = None

    def free_send_buffers(self) -> None:
        """Drop the buffers (after :meth:`wait`); they are re-made on the next stream."""
        assert self._in_flight is None and not self._fill, "free_send_buffers while sends are pending"
        self._fill_buf = self._send_buf = None

    def buffer_bytes(self) -> int:
        """Bytes this reducer holds right now (accumulator, fill and send buffers)."""
        return sum(t.numel() * t.element_size() for t in (self.acc, self._fill_buf, self._send_buf)
                   if t is not None)

    def _buffer(self, name: str, numel: int) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None:
            device = self.acc.device if self.acc is not None else "cpu"
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            setattr(self, name, buf)
        return buf

    # -- the stream --------------------------------------------------------------------
    @torch.no_grad()
    def add(self, param: torch.Tensor, grad: torch.Tensor | None, coeff: float) -> None:
        flat = None if grad is None else grad.detach().reshape(-1)
        blocks = self._blocks.get(id(param))
        if blocks is None:
            blocks = self._blocks[id(param)] = blocks_of(self.layout[id(param)], self.rank)
        for blk in blocks:
            # Spread blocks are cut across their rows (balanced buckets for a reduce-scatter);
            # the others in element order (a bucket then touches few owners).
            across = blk.m > 1 and 2 * blk.m >= self.world and self.fill_cap >= blk.m
            row = col = 0
            while row < blk.m:
                room = self.fill_cap - self._fill
                if across:
                    q = min(blk.width - col, room // blk.m)
                    if q == 0:
                        self.flush()
                        continue
                    self._push(blk, flat, coeff, row, blk.m, col, q)
                    col += q
                    row = blk.m if col == blk.width else 0
                    continue
                if room == 0:
                    self.flush()
                    continue
                if col == 0 and room >= blk.width:  # whole rows
                    rows = min(blk.m - row, room // blk.width)
                    self._push(blk, flat, coeff, row, rows, 0, blk.width)
                    row += rows
                    continue
                n = min(room, blk.width - col)  # part of one row
                self._push(blk, flat, coeff, row, 1, col, n)
                col += n
                if col == blk.width:
                    row, col = row + 1, 0

    def _push(self, blk: Block, flat, coeff: float, row: int, rows: int, col: int, n: int) -> None:
        """Append rows ``[row, row+rows)`` × columns ``[col, col+n)`` of ``blk``, times coeff."""
        f = self._fill
        dst = self._buffer("_fill_buf", self.fill_cap)[f: f + rows * n].view(rows, n)
        if flat is None:
            dst.zero_()
        else:
            src = flat[blk.p_lo: blk.p_lo + blk.m * blk.width].view(blk.m, blk.width)[row: row + rows, col: col + n]
            if src.dtype == torch.float32:
                torch.mul(src, coeff, out=dst)
            else:
                dst.copy_(src).mul_(coeff)
        r0 = blk.r0 + row
        cur = self._cursor[r0: r0 + rows]
        pos = max(cur)
        # The rows of one slab start at one position, so packing moves the slab with one
        # strided copy; an owner behind the others gets a zero gap. Gaps are bounded by the
        # padding allowance (so a bucket always fits the send buffer); past it, row by row.
        if (pos * rows - sum(cur)) > (SCATTER_PAD - 1.0) * rows * n:
            for i in range(rows):
                self._record(blk, row + i, 1, col, n, f + i * n, cur[i])
        else:
            self._record(blk, row, rows, col, n, f, pos)
        self._fill += rows * n

    def _record(self, blk: Block, row: int, rows: int, col: int, n: int, f: int, pos: int) -> None:
        r0 = blk.r0 + row
        self._cursor[r0: r0 + rows] = [pos + n] * rows
        self._slabs.append((r0, rows, f, n, pos))
        if blk.mine is not None and row <= self.rank - blk.r0 < row + rows:
            self._mine.append((pos, blk.mine + col, n))

    @torch.no_grad()
    def flush(self) -> None:
        """Close the bucket: complete the one in flight, pack this one rank-major into the send
        buffer and start its reduction (asynchronously).

        The rule, per bucket: with ``k`` owners intersected, ``seg`` the longest owner row
        and ``fill`` the real elements, one ``reduce_scatter_tensor`` of ``N · seg`` elements
        if ``k ≥ 2`` and ``N · seg ≤ SCATTER_PAD · fill``; otherwise ``k`` reduces of the
        owners' exact rows."""
        if not self._fill:
            return
        self._complete()
        n_ranks, cursor = self.world, self._cursor
        owners = [r for r in range(n_ranks) if cursor[r]]
        seg = max(cursor)
        scatter = (self.scatter and len(owners) > 1 and n_ranks * seg <= SCATTER_PAD * self._fill
                   and n_ranks * seg <= self.send_cap)
        if scatter:
            base, used = [r * seg for r in range(n_ranks)], n_ranks * seg
        else:
            base, used = [0] * n_ranks, 0
            for r in owners:
                base[r], used = used, used + cursor[r]
        send = self._buffer("_send_buf", self.send_cap)[:used]
        if used > self._fill:  # padding or gaps: zeros, so they add nothing
            send.zero_()
        fill = self._fill_buf
        grid = send.view(n_ranks, seg) if scatter else None
        for r0, rows, f, n, pos in self._slabs:
            src = fill[f: f + rows * n].view(rows, n)
            if scatter:
                grid[r0: r0 + rows, pos: pos + n].copy_(src)
            else:
                for i in range(rows):
                    at = base[r0 + i] + pos
                    send[at: at + n].copy_(src[i])
        mine = send[base[self.rank]: base[self.rank] + cursor[self.rank]]
        works = []
        if n_ranks > 1:
            op = self.comm.ReduceOp.SUM
            if scatter:
                # In place (output = this rank's row of the input), as DeepSpeed's ZeRO-3 does.
                works.append(self.comm.reduce_scatter_tensor(send[base[self.rank]: base[self.rank] + seg], send,
                                                             op=op, group=self.group, async_op=True))
                self.calls["reduce_scatter"] += 1
                self.sent_elements += used
            else:
                for r in owners:
                    works.append(self.comm.reduce(send[base[r]: base[r] + cursor[r]], dst=self._global_rank(r),
                                                  op=op, group=self.group, async_op=True))
                self.calls["reduce"] += len(owners)
                self.sent_elements += used
        self._in_flight = (works, mine, self._mine)
        self._reset_bucket()

    def wait(self) -> None:
        """Send what is buffered and fold every finished reduction into ``acc``."""
        self.flush()
        self._complete()

    def _complete(self) -> None:
        if self._in_flight is None:
            return
        works, mine, pieces = self._in_flight
        for w in works:
            w.wait()
        for pos, acc_lo, n in pieces:
            self.acc[acc_lo: acc_lo + n].add_(mine[pos: pos + n])
        self._in_flight = None

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else self.comm.get_global_rank(self.group, r)
