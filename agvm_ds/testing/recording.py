"""A stand-in for ``torch.distributed`` that records the collectives it is handed.

``OwnerReducer(comm=RecordingComm(world))`` runs the real bucketing and packing (on meta or
CPU tensors) while every collective is only written down, so a test can pin the per-bucket
rule and ``bench/comm_scale.py`` can count a 512-rank stream in one process.
"""

from __future__ import annotations

from typing import Optional

import torch


class _Done:
    """What an ``async_op=True`` collective returns; nothing is in flight."""

    def wait(self) -> None:
        pass


class RecordingComm:
    """``log`` holds ``(op, elements handed over, destination rank or None)`` per call."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world: Optional[int] = None):
        self.world = world
        self.log: list[tuple[str, int, Optional[int]]] = []

    @property
    def calls(self) -> int:
        return len(self.log)

    @property
    def elements(self) -> int:
        return sum(n for _, n, _ in self.log)

    def reduce(self, tensor, dst, op=None, group=None, async_op=False):
        self.log.append(("reduce", tensor.numel(), dst))
        return _Done()

    def reduce_scatter_tensor(self, output, input, op=None, group=None, async_op=False):
        if self.world is not None and input.numel() != output.numel() * self.world:
            raise ValueError(f"reduce_scatter_tensor: input of {input.numel()} elements for an output of "
                             f"{output.numel()} on {self.world} ranks")
        self.log.append(("reduce_scatter", input.numel(), None))
        return _Done()
