"""ZeRO-1/2 (``stage_1_and_2.py``): flat, padded param-group buffers cut into equal partitions."""

from __future__ import annotations

import torch

from agvm_ds.core.adapters.base import StageAdapter, _device, _invalid_norm, flat_layout
from agvm_ds.core.chunks import Chunk, concat_into
from agvm_ds import mutations


class Stage12Adapter(StageAdapter):
    """ZeRO-1 and ZeRO-2: flat, padded param-group buffers split into equal partitions."""

    def __init__(self, engine, groups, group_modules):
        super().__init__(engine, groups, group_modules)
        zo = self.zero
        self.stage = int(engine.zero_optimization_stage())
        self.reduces_every_micro_step = self.stage == 2
        # ZeRO-1 with overlap_comm reduces inside its gradient hooks on the boundary
        # micro-step, before allreduce_gradients: the local sum is gone by then
        self.local_grad_at_boundary = self.stage == 1 and not bool(getattr(zo, "overlap_comm", False))
        self._base = []
        base = 0
        for gi in range(len(zo.round_robin_bit16_groups)):
            ps = int(zo.partition_size[gi])
            params = zo.round_robin_bit16_groups[gi]
            self.layout.update(flat_layout(params, [int(o) for o in zo.round_robin_bit16_offsets[gi]], ps,
                                           self.world, base))
            self._base.append((base, ps))
            base += ps
        self.local_numel = base

    def _raw_chunks(self, second_moment=None):
        # At the boundary only (between boundaries ZeRO-2 uses copy_owned_grad).
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            m = self.group_modules[gi]
            v = None
            if second_moment:
                st = zo.optimizer.state.get(zo.single_partition_of_fp32_groups[gi])
                v = None if not st or second_moment not in st else st[second_moment].reshape(-1).float()
            held = zo.averaged_gradients.get(gi) if isinstance(zo.averaged_gradients, dict) else None
            flat = getattr(held, "flat_partition", None)
            if flat is not None:  # bf16 model, fp32 accumulation: one flat buffer already
                yield Chunk(m, gi, base, base + ps, flat.reshape(-1).float(), v)
                continue
            parts = [] if held is None else [t.reshape(-1) for t in held]
            if sum(t.numel() for t in parts) != ps:  # nothing held (or an unexpected shape): zeros / one copy
                grad = torch.zeros(ps, device=self.device) if not parts else torch.cat([t.float() for t in parts])
                yield Chunk(m, gi, base, base + ps, grad, v)
                continue
            # A list of per-parameter views (and padding) covering the partition in order.
            at = 0
            for t in parts:
                n = t.numel()
                yield Chunk(m, gi, base + at, base + at + n, t if t.dtype == torch.float32 else t.float(),
                            None if v is None else v[at:at + n])
                at += n

    def grad_views(self):
        for held in self.zero.averaged_gradients.values():
            if held is None:
                continue
            flat = getattr(held, "flat_partition", None)
            yield from ([flat] if flat is not None else held)

    def local_unreduced_grad(self, p):
        if self.stage != 1:
            return super().local_unreduced_grad(p)
        return self.zero.get_param_gradient_attribute(p)

    def copy_owned_grad(self, out):
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            dst = out[base:base + ps]
            if zo.all_grad_tensors.get(gi) is None:
                dst.zero_()
                continue
            # Views of the reduced running sums plus padding, concatenated straight into
            # ``out``: one copy of P/N, no intermediate flat buffer.
            parts = zo.get_flat_partition(zo.params_in_partition[gi], zo.first_offset[gi], zo.partition_size[gi],
                                          dtype=torch.float32, device=_device(), param_group_idx=gi,
                                          return_tensor_list=True)
            concat_into(dst, [(t.reshape(-1), t.numel()) for t in parts])

    def engine_nonfinite_check(self):
        # stage_1_and_2.step() all-reduces the global norm before any group's step whenever
        # compute_grad_norm is on (the default), reporting inf/NaN as -1; fp32/fp16 then skip
        # the step themselves, bf16 does not: AGVM.step asks this and skips it.
        if not getattr(self.zero, "compute_grad_norm", False):
            return None
        zo = self.zero
        return lambda: _invalid_norm(zo._global_grad_norm)


class Stage12CompactAdapter(Stage12Adapter):
    """ZeRO-2 (or offload-free ZeRO-1 variants) with a bf16 model and ``data_types.
    grad_accum_dtype: "fp32"``: stage_1_and_2 then accumulates each micro-step's reduced
    gradient straight into one fp32 flat partition per group (``averaged_gradients[i].
    flat_partition``, a ``GradPartitionBufferGroup``) and never fills ``all_grad_tensors``,
    which the parent's half-way snapshot reads; without this override the ``micro``
    snapshot is all zeros and every update's statistics are 0/0 (μ silently never moves)."""

    def copy_owned_grad(self, out):
        super().copy_owned_grad(out)  # non-compact groups (e.g. Muon's); compact ones read zeros there
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            if not zo._use_compact_grad_partition_buffer(gi):
                continue
            held = zo.averaged_gradients.get(gi)
            flat = getattr(held, "flat_partition", None)
            dst = out[base:base + ps]
            if flat is None:  # nothing reduced into this group yet
                dst.zero_()
            else:
                dst.copy_(flat.reshape(-1))


class Stage12OffloadAdapter(Stage12Adapter):
    """ZeRO-1/2 with ``offload_optimizer``: DeepSpeed never fills ``averaged_gradients``;
    at the boundary it copies this rank's reduced partition of group ``i`` into
    ``single_partition_of_fp32_groups[i].grad`` (host memory, the tensor the CPU optimizer
    steps), in the same partition layout, padding zero. Between boundaries ZeRO-2 keeps each
    parameter's reduced running sum in ``accumulated_grads_in_cpu[param_id]``, of which
    ``grad_position[param_id] = (group, source offset, partition offset, length)`` is owned —
    or, for a bf16 model with fp32 accumulation, in the group's compact device partition
    (``averaged_gradients[i].flat_partition``).

    Update steps copy the P/N owned elements (and Adam's second moment) to the accelerator
    for the statistics pass: the statistics all-reduce and AGVM's stream stay on device."""

    def _settle(self):
        wait = getattr(self.zero, "_wait_for_offload_copies", None)
        if wait is not None:  # the boundary's non-blocking device-to-host copies
            wait()

    def _raw_chunks(self, second_moment=None):
        self._settle()
        zo = self.zero
        for gi, (base, ps) in enumerate(self._base):
            held = zo.single_partition_of_fp32_groups[gi].grad
            grad = torch.zeros(ps, device=self.device) if held is None else \
                held.reshape(-1).to(self.device, torch.float32, non_blocking=False)
            v = None
            if second_moment:
                st = zo.optimizer.state.get(zo.single_partition_of_fp32_groups[gi])
                if st and second_moment in st:
                    v = st[second_moment].reshape(-1).to(self.device, torch.float32)
            yield Chunk(self.group_modules[gi], gi, base, base + ps, grad, v)

    def grad_views(self):
        for g in self.zero.single_partition_of_fp32_groups:
            if g.grad is not None:
                yield g.grad

    def copy_owned_grad(self, out):
        self._settle()
        zo = self.zero
        out.zero_()
        held = getattr(zo, "accumulated_grads_in_cpu", {})
        compact = getattr(zo, "_use_compact_grad_partition_buffer", lambda gi: False)
        for gi, (base, ps) in enumerate(self._base):
            stale = zo.single_partition_of_fp32_groups[gi].grad if mutations.active("offload_stale") else None
            if stale is not None:
                out[base:base + ps].copy_(stale.reshape(-1))
                continue
            if compact(gi):
                # bf16 weights, fp32 accumulation: the running sum is the device-side compact
                # partition, copied to the host buffer only at the boundary
                flat = getattr(zo.averaged_gradients.get(gi), "flat_partition", None)
                if flat is not None:
                    out[base:base + ps].copy_(flat.reshape(-1))
                continue
            for p in zo.params_in_partition[gi]:
                pid = zo.get_param_id(p)
                if pid not in held:
                    continue
                _, src, dst, n = zo.grad_position[pid]
                buf = held[pid].reshape(-1)
                piece = buf[src:src + n] if buf.numel() != n else buf
                out[base + dst:base + dst + n].copy_(piece)
