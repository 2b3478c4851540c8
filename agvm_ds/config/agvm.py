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
    (:func:`agvm_ds.zero.settings.choose_estimator`); a run with neither is refused, naming the fix. Every float
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
