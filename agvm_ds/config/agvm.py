"""The ``agvm`` section of a run config (validated like DeepSpeed's own sections)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from agvm_ds.config.base import ConfigModel


class AGVMConfig(ConfigModel):
    """AGVM hyper-parameters (paper §3; defaults from the paper and the authors' release).

    ``interval`` is τ, ``momentum`` is α of Eq. (5). ``start_step`` None means "0" through
    the Python API; the launcher replaces it by the end of warmup. ``clamp`` bounds the
    variance ratio Φ_anchor/Φ_i *before* the square root, so μ ∈ [sqrt(lo), sqrt(hi)].

    ``bucket_size`` is AGVM's memory beyond its P/N accumulator, in fp32 elements: the
    ``ranks`` stream's fill and send buffers (core/reducer.py) and the statistics pass's
    staging/scratch. None (default) follows DeepSpeed: room for one bucket of
    ``zero_optimization.reduce_bucket_size`` elements filling while the previous one is in
    flight (``(1 + SCATTER_PAD)`` × that, capped at the model's size), so AGVM's buckets —
    and its collectives per micro-step — are ZeRO's own. A number overrides it.

    ``estimator``: ``"auto"`` (default) takes ``micro`` when a step has at least two
    micro-batches per rank and ``ranks`` when it has one micro-batch on two or more ranks
    (:func:`choose_estimator`); a run with neither is refused, naming the fix. Every float
    is finite (``allow_inf_nan`` is off for every config section).
    """

    enabled: bool = True
    anchor: Optional[str] = None  # None: the model's metadata (its first module)
    interval: int = Field(10, ge=1)
    momentum: float = Field(0.97, ge=0.0, lt=1.0)
    start_step: Optional[int] = Field(None, ge=0)
    clamp: tuple[float, float] = (0.5, 10.0)
    eps: float = Field(1e-6, ge=0.0)
    estimator: Literal["auto", "micro", "ranks"] = "auto"
    precondition: Literal["auto", "none", "adam"] = "auto"
    skip_nonfinite: bool = True
    bucket_size: Optional[int] = Field(None, ge=1024)
    #: run agvm_ds.selfcheck with this run's DeepSpeed sections before training (launcher only)
    selfcheck: bool = False

    @field_validator("clamp")
    @classmethod
    def _clamp_ordered(cls, v):
        lo, hi = v
        if not (lo > 0):
            raise ValueError(f"clamp lo must be > 0, got {lo}")
        if lo > hi:
            raise ValueError(f"clamp lo ({lo}) must be <= hi ({hi})")
        return v


def choose_estimator(name: str, grad_accum: int, world_size: int) -> tuple[str, bool]:
    """The estimator ``agvm.estimator: name`` runs with at ``grad_accum`` micro-batches per
    step and ``world_size`` data-parallel ranks, and whether that is ``micro`` falling back
    to the ``ranks`` split (worth a log line). The one place the choice is made: the config
    check (a run file checked for a world size), the launcher and ``agvm_ds.initialize``
    (through :func:`agvm_ds.core.estimators.build_estimator`) all ask here.

    Raises:
        ValueError: no estimator of that name can split this run; the message starts
            with ``agvm.estimator:`` and names the fix.
    """
    gas, world = int(grad_accum), int(world_size)
    layout = f"gradient_accumulation_steps={gas} on {world} rank{'s' if world != 1 else ''}"
    if name == "auto":
        if gas >= 2:
            return "micro", False
        if world >= 2:
            return "ranks", False
        raise ValueError(f"agvm.estimator: 'auto' needs two gradient halves: at least 2 micro-batches per step "
                         f"(gradient_accumulation_steps >= 2) or at least 2 data-parallel ranks; this run has "
                         f"{layout}. Set train_batch_size to 2 x train_micro_batch_size_per_gpu and leave "
                         f"gradient_accumulation_steps out (the accumulation count then follows the world "
                         f"size), or set agvm.enabled: false")
    if name == "micro":
        if gas >= 2:
            return "micro", False
        if world >= 2:
            return "ranks", True
        raise ValueError(f"agvm.estimator: 'micro' needs gradient_accumulation_steps >= 2 on a single rank "
                         f"(there is only one micro-batch to compare); this run has {layout}. Set "
                         f"gradient_accumulation_steps to 2 or more (or train_batch_size to 2 x "
                         f"train_micro_batch_size_per_gpu without gradient_accumulation_steps)")
    if name == "ranks":
        if world >= 2:
            return "ranks", False
        raise ValueError(f"agvm.estimator: 'ranks' needs at least 2 data-parallel ranks; this run has {layout}. "
                         f"Use 'auto' or 'micro' with gradient_accumulation_steps >= 2, or launch 2 or more ranks")
    raise ValueError(f"agvm.estimator: unknown estimator {name!r} (auto, micro or ranks)")
