"""Learning-rate schedules as multipliers of the peak lr, one function per shape."""

from __future__ import annotations

import math

from dsmoe.config import TrainConfig


def warmup_cosine(step: int, t: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps (the first step already trains), then cosine to min_lr_ratio.

    `step` counts optimizer steps taken so far; the value is the multiplier for the next step.
    The multiplier reaches min_lr_ratio exactly at the last step, max_steps - 1.
    """
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    decay_steps = max(1, t.max_steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, t: TrainConfig) -> float:
    """Linear warmup as in warmup_cosine, then a straight line to min_lr_ratio at the last step
    (MosaicBERT's recipe: 6% warmup, decay to 0.02 x peak; papers/mosaicbert.md)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    decay_steps = max(1, t.max_steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return 1.0 - (1.0 - t.min_lr_ratio) * progress


def lr_multiplier(step: int, t: TrainConfig) -> float:
    """The multiplier of the schedule `train.schedule` names."""
    return warmup_linear(step, t) if t.schedule == "linear" else warmup_cosine(step, t)
