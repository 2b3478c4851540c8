"""DeepSpeed's ``BF16_Optimizer`` (bf16 weights, ZeRO-1, fp32 gradient accumulation)."""

from __future__ import annotations

import torch

from agvm_ds.core.adapters.base import StageAdapter, _invalid_norm, flat_layout
from agvm_ds.core.chunks import Chunk
from agvm_ds.zero_layout import packed_offsets


class BF16OptimizerAdapter(StageAdapter):
    """DeepSpeed's ``BF16_Optimizer`` (bf16 model, ZeRO-1, ``data_types.grad_accum_dtype:
    "fp32"``; deepspeed/runtime/bf16_optimizer.py). Its layout per param group ``i``:

    * ``bf16_groups[i]`` — the trainable params, back to back in one flat buffer padded at
      the end to a multiple of ``2 · world``; ``partition_size = flat.numel() // world``;
      rank ``r`` owns ``[r · ps, (r + 1) · ps)`` (its fp32 master is
      ``fp32_groups_flat_partition[i]``, the tensor the base optimizer steps, so Adam's
      second moment is that tensor's state, e.g. ``exp_avg_sq``);
    * ``fp32_groups_gradients_flat[i]`` — a *full* (unpartitioned) fp32 gradient buffer of
      the same layout. The engine's backward epilogue adds each micro-step's bf16 grads
      into it (``update_hp_grads``, or hooks with ``immediate_grad_update``), so before the
      boundary reduction it holds this rank's local, unreduced running sum
      (``fp32_groups_gradients[i][j]`` per param); at the boundary the engine all-reduces
      it in place (averaging, in ``communication_data_type``), after which this rank's
      owned part is ``fp32_groups_gradient_flat_partition[i]``.

    It reduces only at the boundary (like ZeRO-1), computes the global norm of the full
    averaged gradient on every step and skips the step itself when it is inf/NaN
    (``overflow``), in every configuration."""

    reduces_every_micro_step = False

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        zo = self.zero
        self.stage = int(engine.zero_optimization_stage())
        self._where = {}  # id(param) -> (group, index in the group): local_unreduced_grad
        self._base = []
        base = 0
        for gi, params in enumerate(zo.bf16_groups):
            ps = int(zo.fp32_groups_gradient_flat_partition[gi].numel())
            self.layout.update(flat_layout(params, packed_offsets([p.numel() for p in params]), ps, self.world, base))
            self._where.update({id(p): (gi, j) for j, p in enumerate(params)})
            self._base.append((base, ps))
            base += ps
        self.local_numel = base
        missing = [p for p in self.params if id(p) not in self.layout]
        if missing:  # AGVM's groups and BF16_Optimizer's must be the same parameters
            raise ValueError(f"BF16_Optimizer holds no partition for {len(missing)} AGVM parameter(s)")

    def _raw_chunks(self, second_moment=None):
        # At the boundary (after the all-reduce): one view of this rank's owned averaged
        # gradient per group, padding included (zero there, as in DeepSpeed's buffer).
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            v = None
            if second_moment:
                st = zo.optimizer.state.get(zo.fp32_groups_flat_partition[gi])
                v = None if not st or second_moment not in st else st[second_moment].reshape(-1).float()
            g = zo.fp32_groups_gradient_flat_partition[gi].reshape(-1)
            yield Chunk(self.group_modules[gi], gi, base, base + ps, g if g.dtype == torch.float32 else g.float(), v)

    def local_unreduced_grad(self, p):
        gi, j = self._where[id(p)]
        return self.zero.fp32_groups_gradients[gi][j]

    def copy_owned_grad(self, out):
        # Only ZeRO-2/3 snapshot between boundaries; BF16_Optimizer streams local sums instead.
        raise NotImplementedError("BF16_Optimizer reduces only at the accumulation boundary")

    def engine_nonfinite_check(self):
        # BF16_Optimizer.step() computes the global norm of the (all-reduced, hence equal on
        # every rank) averaged gradient before calling the base step, and returns early with
        # ``overflow`` set when it is inf/NaN; the guard below is a second line.
        zo = self.zero
        return lambda: _invalid_norm(getattr(zo, "_global_grad_norm", None))
