"""Per-DeepSpeed-layout adapters: where this rank's share of the averaged gradient lives.

One file per layout DeepSpeed 0.19 keeps gradients in (``stage0``, ``zero12``,
``bf16_optimizer``, ``stage3``; the common bookkeeping in ``base``); :func:`build_adapter`
picks one per engine. The flat cut they share is :func:`agvm_ds.zero_layout.flat_cut`.
Which DeepSpeed settings these layouts do *not* cover (offload, ZeRO-1 with overlap_comm
for the ranks split …) is refused before start-up by :mod:`agvm_ds.zero.support`.
:func:`attach_controller` is the one seam between a statistics controller and its engine.
"""

from __future__ import annotations

from agvm_ds.core.adapters.base import Piece, StageAdapter, set_engine_gradient_clipping
from agvm_ds.core.adapters.bf16_optimizer import BF16OptimizerAdapter
from agvm_ds.core.adapters.stage0 import Stage0Adapter
from agvm_ds.core.adapters.stage3 import Stage3Adapter
from agvm_ds.core.adapters.zero12 import Stage12Adapter, Stage12CompactAdapter, Stage12OffloadAdapter
from agvm_ds.errors import ConfigError

__all__ = ["BF16OptimizerAdapter", "Piece", "Stage0Adapter", "Stage12Adapter", "Stage12CompactAdapter", "Stage12OffloadAdapter",
           "Stage3Adapter", "StageAdapter", "attach_controller", "build_adapter", "set_engine_gradient_clipping"]


def build_adapter(engine, groups, group_modules) -> StageAdapter:
    stage = int(engine.zero_optimization_stage())
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(engine.optimizer, BF16_Optimizer):  # bf16 + ZeRO-1 + fp32 grad accumulation
        return BF16OptimizerAdapter(engine, groups, group_modules)
    if stage in (1, 2) and getattr(engine.optimizer, "_use_compact_grad_partition_buffer", None) is not None \
            and not getattr(engine.optimizer, "cpu_offload", False) and any(engine.optimizer._use_compact_grad_partition_buffer(i)
                    for i in range(len(engine.optimizer.round_robin_bit16_groups))):
        return Stage12CompactAdapter(engine, groups, group_modules)
    if stage in (1, 2) and getattr(engine.optimizer, "cpu_offload", False):
        return Stage12OffloadAdapter(engine, groups, group_modules)
    if stage == 0:
        return Stage0Adapter(engine, groups, group_modules)
    if stage in (1, 2):
        return Stage12Adapter(engine, groups, group_modules)
    if stage == 3:
        return Stage3Adapter(engine, groups, group_modules)
    raise ValueError(f"unsupported ZeRO stage {stage}")


def attach_controller(engine, controller) -> None:
    """The one seam between a statistics controller and its engine.

    Routes the engine's backward epilogue, stage-0/1 boundary reduction and optimizer step
    to the controller's callbacks (:func:`_install_engine_hooks`), registers its forward
    pre-hook on the module where its estimator asks for one, and sets ``engine.agvm`` (what
    ``agvm_ds.modulation``, the training loop and elastic resume read). Checkpoints reach
    the controller through the checkpoint engine, not through the engine's methods."""
    _install_engine_hooks(engine, controller._after_backward, controller._before_reduction,
                          controller._after_optimizer_step, controller.adapter.engine_skipped_step)
    if controller.wants_forward_hook:
        engine.module.register_forward_pre_hook(controller._on_forward)
    engine.set_gradient_accumulation_boundary = _refuse_manual_boundary
    engine.agvm = controller


def _refuse_manual_boundary(*args, **kwargs):
    """DeepSpeed's manual boundary (``engine.set_gradient_accumulation_boundary``) moves the
    step DeepSpeed reduces on away from the every-``gradient_accumulation_steps`` rhythm AGVM's
    halves are cut by; refused in one line at its first call, before any statistic is taken."""
    raise ConfigError("engine.set_gradient_accumulation_boundary: AGVM's gradient halves follow DeepSpeed's "
                      "managed boundary (every gradient_accumulation_steps micro-batches); a manual boundary "
                      "is refused — call engine.backward and engine.step every micro-batch, or set agvm.enabled "
                      "false")


def _install_engine_hooks(engine, after_backward, before_reduction, after_step, engine_skipped):
    """Wrap the engine's backward epilogue (every backward, after DeepSpeed's reduction and
    before any clipping), for stages 0/1 its boundary reduction (local grads still
    unreduced), and the step of the optimizer the engine drives (ZeRO's, or AGVM itself),
    which reports whether DeepSpeed skipped it. Instance attributes shadow the methods, so
    DeepSpeed's own calls and its torch-style backward hook path go through the wrappers."""
    orig_epilogue = engine._backward_epilogue
    orig_reduce = engine.allreduce_gradients
    opt = engine.optimizer
    orig_step = opt.step

    def _backward_epilogue():
        orig_epilogue()
        after_backward()

    def allreduce_gradients(*args, **kwargs):
        before_reduction()
        return orig_reduce(*args, **kwargs)

    def step(*args, **kwargs):
        out = orig_step(*args, **kwargs)
        after_step(engine_skipped())
        return out

    engine._backward_epilogue = _backward_epilogue
    engine.allreduce_gradients = allreduce_gradients
    opt.step = step
