"""ZeRO-3: every parameter partitioned on its own (``ds_tensor``, ``ceil(numel / N)`` per rank)."""

from __future__ import annotations

import torch

from agvm_ds.core.adapters.base import StageAdapter, _invalid_norm
from agvm_ds.core.chunks import Chunk


class Stage3Adapter(StageAdapter):
    stage = 3
    reduces_every_micro_step = True
    local_grad_at_boundary = False

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        # ZeRO-3 partitions every parameter on its own: ceil(numel / N) elements per rank.
        self._own = self._per_parameter_layout(lambda p: (int(p.ds_numel), int(p.ds_tensor.ds_numel)))

    def _raw_chunks(self, second_moment=None):
        from deepspeed.utils import safe_get_local_grad, safe_get_local_optimizer_state

        for m, gi, p, lo, hi, acc in self._own:
            g = safe_get_local_grad(p)
            grad = torch.zeros(hi - lo, device=self.device) if g is None else g.reshape(-1)[: hi - lo].float()
            v = None
            if second_moment:
                try:
                    s = safe_get_local_optimizer_state(p, second_moment)
                except (KeyError, AttributeError, AssertionError):
                    s = None
                v = None if s is None else s.reshape(-1)[: hi - lo].float()
            yield Chunk(m, gi, acc, acc + hi - lo, grad, v)


    def engine_nonfinite_check(self):
        # stage3.step() all-reduces the global norm and skips the step on inf/NaN (-1) in
        # every precision before any sub-group's step; the test below is a second line.
        zo = self.zero
        return lambda: _invalid_norm(zo._global_grad_norm)

    def copy_owned_grad(self, out):
        """The reduced running sum between boundaries. Without offload ``safe_get_local_grad``
        returns it; with ``offload_optimizer`` that helper reads the host fp32 gradient, which
        DeepSpeed fills only at the boundary, while the running sum stays in the device-side
        partition buffer (``__param_id_to_grad_partition[ds_id]``, read here by its mangled name)."""
        zo = self.zero
        if not getattr(zo, "offload_optimizer", False):
            return super().copy_owned_grad(out)
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().resolves_data_dependency():
            zo.reduce_and_partition_stream.synchronize()
        held = getattr(zo, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
        for _, _, p, lo, hi, acc in self._own:
            dst = out[acc:acc + hi - lo]
            buf = held.get(p.ds_id)
            if buf is None:
                dst.zero_()
            else:
                dst.copy_(buf.reshape(-1)[:hi - lo])

