"""Learning-rate schedules and the curricula of the seed models, as pure functions of the step.

Every schedule warms up linearly from 0 to optim.lr over optim.warmup_steps, then
- constant: stays at lr;
- linear:   decays linearly to min_lr at train.steps;
- cosine:   decays along a half cosine to min_lr at train.steps;
- wsd:      warmup-stable-decay (ModernBERT's trapezoid): stays at lr, then over the last
            optim.decay_steps falls to min_lr as 1 - sqrt(progress).
"""

from __future__ import annotations

import math

import numpy as np

from megatron_jp.config import ConfigError, OptimConfig


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":
        decay = optim.decay_steps or max(total_steps // 10, 1)
        start = max(total_steps - decay, optim.warmup_steps)
        progress = min(max(step - start, 0) / max(total_steps - start, 1), 1.0)
        return optim.min_lr + (optim.lr - optim.min_lr) * (1 - math.sqrt(progress))
    progress = min((step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1), 1.0)
    if optim.schedule == "linear":
        factor = 1 - progress
    else:  # cosine
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def parse_stages(text: str, key: str, cast=float) -> list[tuple[int, float]]:
    """"0:128,1000:256" -> [(0, 128), (1000, 256)]; steps must start at 0 and increase."""
    stages = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            step, value = item.split(":")
            stages.append((int(step), cast(value)))
        except ValueError:
            raise ConfigError(f"{key}: cannot read {item!r}; write STEP:VALUE pairs like \"0:128,1000:256\"") from None
    if stages and (stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:]))):
        raise ConfigError(f"{key}: stages must start at step 0 and have increasing steps, got {text!r}")
    return stages


def stage_value(stages: list[tuple[int, float]], step: int, default):
    """The value of the last stage that has begun at `step` (the default without stages)."""
    value = default
    for start, stage in stages:
        if step >= start:
            value = stage
    return value


def parse_rampup(text: str) -> tuple[int, int, int] | None:
    if not text.strip():
        return None
    try:
        start, increment, steps = (int(v) for v in text.split())
    except ValueError:
        raise ConfigError(f"train.rampup_batch_size: expected \"START INCREMENT STEPS\", got {text!r}") from None
    return start, increment, steps


def global_batch_size(step: int, rampup: tuple[int, int, int] | None, final: int) -> int:
    """Megatron-style ramp-up: START, START+INCREMENT, ... in equal step intervals up to `final`."""
    if rampup is None:
        return final
    start, increment, steps = rampup
    n_stages = max((final - start) // increment, 1)
    stage = min(step * n_stages // max(steps, 1), n_stages)
    return min(start + stage * increment, final)


class BatchSizeSchedule:
    """The global batch size per step (with its ramp-up) and the inverse the data loader needs:
    which step a sample position falls in (`step_of(consumed_samples)`), so that curricula keyed by
    step stay right while the batch grows."""

    def __init__(self, rampup: tuple[int, int, int] | None, final: int):
        self.rampup, self.final = rampup, final
        ramp_steps = rampup[2] if rampup else 0
        sizes = np.array([self(step) for step in range(ramp_steps)], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # consumed samples at the start of each step
        self._ramp_steps = ramp_steps

    def __call__(self, step: int) -> int:
        return global_batch_size(step, self.rampup, self.final)

    def step_of(self, consumed: int) -> int:
        after_ramp = consumed - int(self._starts[-1])
        if after_ramp >= 0:
            return self._ramp_steps + after_ramp // self.final
        return int(np.searchsorted(self._starts, consumed, side="right")) - 1

    def consumed_at(self, step: int) -> int:
        """Samples consumed before `step` begins."""
        if step <= self._ramp_steps:
            return int(self._starts[step])
        return int(self._starts[-1]) + (step - self._ramp_steps) * self.final
