"""Everything that is a function of the optimizer step: the learning rate, the batch-size ramp-up
and the seq-length / mask-rate curricula of the seed models. Pure functions and small callables.

Every learning-rate schedule warms up linearly from 0 to optim.lr over optim.warmup_steps, then
- constant: stays at lr;
- linear:   decays linearly to min_lr at train.steps;
- cosine:   decays along a half cosine to min_lr at train.steps;
- wsd:      warmup-stable-decay (ModernBERT's trapezoid): stays at lr, then over the last
            optim.decay_steps falls to min_lr as 1 - sqrt(progress).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_jp.config import Config, OptimConfig, RampUp, Stages


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


class StagedSchedule:
    """Piecewise constant: {first step: value}; e.g. {0: 128, 90000: 512} for seq-length stages.
    `values()` lists every stage's value (the data loader builds each length's index ahead)."""

    def __init__(self, stages: dict):
        if 0 not in stages:
            raise ValueError(f"stages {stages} must define step 0")
        self.stages = sorted((int(s), v) for s, v in stages.items())

    @classmethod
    def of(cls, stages: Stages, default) -> "StagedSchedule":
        """A parsed curriculum, or the constant `default` without one."""
        return cls(dict(stages.points) if stages else {0: default})

    def __call__(self, step: int):
        return [v for s, v in self.stages if s <= step][-1]

    def values(self) -> list:
        return [v for _, v in self.stages]


class LinearSchedule:
    """start -> end linearly over steps [start_step, start_step + steps], constant outside."""

    def __init__(self, start: float, end: float, steps: int, start_step: int = 0):
        self.start, self.end, self.steps, self.start_step = start, end, max(int(steps), 1), start_step

    def __call__(self, step: int) -> float:
        t = min(max((step - self.start_step) / self.steps, 0.0), 1.0)
        return float(self.start + t * (self.end - self.start))


def global_batch_size(step: int, rampup: RampUp | None, final: int) -> int:
    """Megatron-style ramp-up: START, START+INCREMENT, ... in equal step intervals up to `final`."""
    if rampup is None:
        return final
    n_stages = max((final - rampup.start) // rampup.increment, 1)
    stage = min(step * n_stages // max(rampup.steps, 1), n_stages)
    return min(rampup.start + stage * rampup.increment, final)


class BatchSizeSchedule:
    """The global batch size per step (with its ramp-up) and the inverse the data loader needs:
    which step a sample position falls in (`step_of(consumed_samples)`), so that curricula keyed by
    step stay right while the batch grows."""

    def __init__(self, rampup: RampUp | None, final: int):
        self.rampup, self.final = rampup, final
        ramp_steps = rampup.steps if rampup else 0
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


@dataclass
class Curricula:
    """The run's functions of the step, from its config."""

    batch: BatchSizeSchedule
    seq_length: StagedSchedule
    mask_prob: StagedSchedule

    @classmethod
    def from_config(cls, cfg: Config) -> "Curricula":
        d, t = cfg.data, cfg.train
        return cls(BatchSizeSchedule(t.rampup_batch_size, t.global_batch_size),
                   StagedSchedule.of(d.seq_length_stages, d.seq_length),
                   StagedSchedule.of(d.mask_prob_stages, d.mask_prob))
