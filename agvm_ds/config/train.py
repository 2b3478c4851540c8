"""The ``train`` section of a run file: length, lr schedule, clipping window, cadence.

Everything the launcher decides that is neither DeepSpeed's (batch sizes, ZeRO, precision,
the base optimizer), nor AGVM's (the ``agvm`` section), nor the model's or the data's.

Example::

    "train": {
        "max_steps": 300, "warmup_steps": 50, "warmup": "linear", "decay": "cosine",
        "lr_scaling": {"base_lr": 0.02, "base_batch": 16, "sqrt_above": 128},
        "grad_clip": {"max_norm": 1.0, "start_step": 0, "end_step": 150},
        "eval_every": 100, "checkpoint_every": 100
    }

Notes:
    Training is counted in optimizer steps. ``epochs`` (and ``warmup_epochs``) are
    converted to steps at launch, once the dataset size and the global batch are known:
    ``steps = ceil(epochs * len(train_set) / global_batch)``.

Limitations:
    Step-decay milestones are *fractions* of the run (``[0.667, 0.917]`` is the usual
    8/12 + 11/12 schedule), so a run keeps its shape when its length is overridden.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from agvm_ds.config.base import ConfigModel


class LrScalingConfig(ConfigModel):
    """The paper's batch-size rule: linear up to a reference batch, square root above.

    ``lr = base_lr * B / base_batch`` for ``B <= sqrt_above``, and
    ``lr = base_lr * sqrt_above / base_batch * sqrt(B / sqrt_above)`` above it
    (paper §4: 0.02 per 16 images up to 128, then 0.16 * sqrt(B / 128)). ``sqrt_above``
    null means linear at every batch. The chosen lr replaces ``optimizer.params.lr`` and is
    logged at start-up.
    """

    base_lr: float = Field(gt=0, description="lr at base_batch images per step")
    base_batch: int = Field(ge=1, description="batch the base_lr was tuned for")
    sqrt_above: Optional[int] = Field(default=None, ge=1,
                                      description="switch from linear to sqrt scaling here")


class GradClipConfig(ConfigModel):
    """Global-norm gradient clipping applied only in the step window [start_step, end_step).

    The authors clip (max norm 1.0) only in a window around the end of warmup. When this
    block is present the launcher owns DeepSpeed's ``gradient_clipping`` (it is 0 outside
    the window); setting both is an error.
    """

    max_norm: float = Field(gt=0)
    start_step: int = Field(default=0, ge=0)
    end_step: Optional[int] = Field(default=None, ge=1, description="null = until the end")

    @model_validator(mode="after")
    def _window(self):
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be greater than start_step "
                             f"({self.start_step})")
        return self


class TrainConfig(ConfigModel):
    """Validated ``train`` section (see the module docstring for an example)."""

    seed: int = Field(default=0, ge=0)
    max_steps: Optional[int] = Field(default=None, ge=1, description="optimizer steps")
    epochs: Optional[float] = Field(default=None, gt=0, description="alternative to max_steps")

    # -- learning-rate schedule (applied to each group's base lr; AGVM's mu sits on top)
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    warmup_epochs: Optional[float] = Field(default=None, ge=0)
    warmup: Literal["linear", "exponential", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.001, gt=0, le=1,
                                description="lr factor at step 0 of warmup")
    decay: Literal["step", "cosine", "none"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [0.667, 0.917],
                                    description="step decay points, fractions of the run")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step decay factor")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine floor")
    lr_scaling: Optional[LrScalingConfig] = None
    grad_clip: Optional[GradClipConfig] = None

    # -- parameter groups
    norm_bias_decay: bool = Field(default=False,
                                  description="apply weight decay to norm weights and biases")

    # -- cadence and outputs
    eval_every: int = Field(default=0, ge=0, description="steps; 0 = only at the end")
    eval_at_end: bool = True
    eval_batch_size: Optional[int] = Field(default=None, ge=1,
                                           description="per rank; null = micro batch")
    checkpoint_every: int = Field(default=0, ge=0, description="steps; 0 = only at the end")
    checkpoint_at_end: bool = True
    keep_checkpoints: int = Field(default=0, ge=0, description="keep the newest N; 0 = all")
    log_every: int = Field(default=1, ge=1, description="steps between monitor/progress updates")
    max_consecutive_skips: int = Field(default=20, ge=0, description="stop after this many optimizer steps "
                                       "skipped in a row (non-finite gradients); 0 = never")
    plot: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps and epochs")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give at most one of warmup_steps and warmup_epochs")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones must be fractions in (0, 1], got {self.milestones}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self
