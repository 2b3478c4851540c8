"""The stream of chunks a rank's statistics pass reads: contiguous runs of its local layout.

Adapters (:mod:`agvm_ds.core.adapters`) produce raw chunks — often one per parameter or per
gradient tensor DeepSpeed holds; :func:`coalesce` merges runs of small ones into long vectors
so the pass (:mod:`agvm_ds.core.statistics`) runs a few large operations instead of a
dozen per parameter. Pure tensor code, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch


@dataclass
class Chunk:
    module: int
    group: int
    lo: int
    hi: int
    grad: torch.Tensor                 # fp32, hi - lo elements
    second_moment: Optional[torch.Tensor] = None


def coalesce(raw: Iterable[Chunk], width: int, staging: Optional[dict] = None) -> Iterator[Chunk]:
    """Merge runs of adjacent small chunks (same module and group) into one chunk whose
    tensors are staging buffers of ``width`` elements, reused from run to run. Chunks of at
    least ``width / 2`` elements pass through uncopied. Memory: two staging buffers."""
    staging = {} if staging is None else staging
    run: list[Chunk] = []
    size = 0

    def buffer(name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in staging:
            staging[name] = torch.empty(width, dtype=torch.float32, device=like.device)
        return staging[name]

    def merged() -> Chunk:
        if len(run) == 1:
            return run[0]
        first = run[0]
        grad = buffer("grad", first.grad)[:size]
        concat_into(grad, [(c.grad, c.hi - c.lo) for c in run])
        v = None
        if any(c.second_moment is not None for c in run):
            v = buffer("v", first.grad)[:size]
            concat_into(v, [(c.second_moment, c.hi - c.lo) for c in run])
        return Chunk(first.module, first.group, first.lo, run[-1].hi, grad, v)

    for ch in raw:
        n = ch.hi - ch.lo
        if run and (n >= width // 2 or size + n > width or ch.module != run[-1].module
                    or ch.group != run[-1].group or ch.lo != run[-1].hi):
            yield merged()
            run, size = [], 0
        if n >= width // 2:
            yield ch
            continue
        run.append(ch)
        size += n
    if run:
        yield merged()


def concat_into(dst: torch.Tensor, parts: list[tuple[Optional[torch.Tensor], int]]) -> None:
    """Copy 1-D parts back to back into ``dst``; a ``None`` part is that many zeros (a
    parameter without Adam state yet)."""
    if all(t is not None and t.dtype == dst.dtype for t, _ in parts):
        torch.cat([t for t, _ in parts], out=dst)
        return
    at = 0
    for t, n in parts:
        if t is None:
            dst[at:at + n].zero_()
        else:
            dst[at:at + n].copy_(t)
        at += n
