"""Learning-rate schedule, the paper's batch-scaling rule and the clipping window.

The schedule is a pure function of the optimizer step, so a resumed run needs no
scheduler state: before every step the loop writes ``group["lr"] = group["base_lr"] *
factor(step)`` into each param group. AGVM multiplies by its module's μ around the base
optimizer's step and restores the value afterwards (:mod:`agvm_ds.core.optimizer`), so the schedule never sees μ.

Notes:
    * warmup ``linear``: ``r + (1 - r) * s / W``; ``exponential``: ``r ** (1 - s / W)``;
      ``constant``: ``r`` until step W (``r`` = ``train.warmup_ratio``).
    * decay ``step``: ``gamma ** k`` after k milestones; ``cosine``: from 1 at the end of
      warmup down to ``min_lr_ratio`` at the last step; ``none``: 1.

Limitations:
    A DeepSpeed ``scheduler`` section is refused by the config loader: two schedulers
    writing the same ``lr`` would fight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from agvm_ds.config.train import LrScalingConfig, TrainConfig


def scaled_lr(rule: LrScalingConfig, batch: int) -> float:
    """The paper's rule: linear in the batch up to ``sqrt_above``, square root beyond."""
    if rule.sqrt_above is None or batch <= rule.sqrt_above:
        return rule.base_lr * batch / rule.base_batch
    return rule.base_lr * rule.sqrt_above / rule.base_batch * math.sqrt(batch / rule.sqrt_above)


@dataclass(frozen=True)
class LrSchedule:
    """Multiplicative lr factor per optimizer step (see the module docstring)."""

    total_steps: int
    warmup_steps: int = 0
    warmup: str = "linear"
    warmup_ratio: float = 0.001
    decay: str = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            r = self.warmup_ratio
            if self.warmup == "linear":
                return r + (1.0 - r) * frac
            if self.warmup == "exponential":
                return r ** (1.0 - frac)
            return r
        if self.decay == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.decay == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    def apply(self, param_groups, step: int) -> float:
        """Write the scheduled lr of ``step`` into every group; return the factor."""
        f = self.factor(step)
        for group in param_groups:
            group["lr"] = group.get("base_lr", group["lr"]) * f
        return f


def steps_from_epochs(epochs: float, dataset_len: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * dataset_len / global_batch))


def resolve_steps(train: TrainConfig, dataset_len: int, global_batch: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) from steps or epochs."""
    total = train.max_steps if train.max_steps is not None else steps_from_epochs(
        train.epochs, dataset_len, global_batch)
    if train.warmup_epochs is not None:
        warmup = round(train.warmup_epochs * dataset_len / global_batch)
    else:
        warmup = train.warmup_steps or 0
    return total, min(warmup, total)


def build_lr_schedule(train: TrainConfig, total_steps: int, warmup_steps: int) -> LrSchedule:
    milestones = tuple(sorted({max(1, round(m * total_steps)) for m in train.milestones}))
    return LrSchedule(total_steps=total_steps, warmup_steps=warmup_steps, warmup=train.warmup,
                      warmup_ratio=train.warmup_ratio, decay=train.decay,
                      milestones=milestones if train.decay == "step" else (),
                      gamma=train.gamma, min_lr_ratio=train.min_lr_ratio)


def clip_norm_at(train: TrainConfig, step: int) -> Optional[float]:
    """Max grad norm the clipping window wants at ``step`` (0 = off); None = not managed."""
    clip = train.grad_clip
    if clip is None:
        return None
    inside = step >= clip.start_step and (clip.end_step is None or step < clip.end_step)
    return clip.max_norm if inside else 0.0
