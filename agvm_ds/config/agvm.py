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
    """

    enabled: bool = True
    anchor: Optional[str] = None  # None: the model's metadata (its first module)
    interval: int = Field(10, ge=1)
    momentum: float = Field(0.97, ge=0.0, lt=1.0)
    start_step: Optional[int] = Field(None, ge=0)
    clamp: tuple[float, float] = (0.5, 10.0)
    eps: float = Field(1e-6, ge=0.0)
    estimator: Literal["micro", "ranks"] = "micro"
    precondition: Literal["auto", "none", "adam"] = "auto"
    skip_nonfinite: bool = True
    bucket_size: int = Field(5_000_000, ge=1024)

    @field_validator("clamp")
    @classmethod
    def _clamp_ordered(cls, v):
        lo, hi = v
        if not (lo > 0):
            raise ValueError(f"clamp lo must be > 0, got {lo}")
        if lo > hi:
            raise ValueError(f"clamp lo ({lo}) must be <= hi ({hi})")
        return v
