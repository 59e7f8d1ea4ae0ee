"""Learning-rate schedules as pure functions of the step: the step is the schedule's whole state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

SchedulerName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the base learning rate at each optimizer step (0-based, before the step)."""

    name: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    cycles: int = 1  # cosine_with_restarts
    power: float = 1.0  # polynomial
    end_factor: float = 0.0  # linear / polynomial / cosine end value, as a fraction of the base lr

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise ValueError(f"`scheduler` should be one of {', '.join(SCHEDULERS)}, got {self.name!r}")
        if self.total_steps < 1:
            raise ValueError(f"`total_steps` should be at least 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"`warmup_steps` should be between 0 and the {self.total_steps} training steps, "
                f"got {self.warmup_steps}"
            )
        if self.cycles < 1:
            raise ValueError(f"`cycles` should be at least 1, got {self.cycles}")
        if self.power <= 0:
            raise ValueError(f"`power` should be positive, got {self.power}")

    def factor(self, step: int) -> float:
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name == "constant_with_warmup":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        end = self.end_factor
        if self.name == "linear":
            return end + (1.0 - end) * (1.0 - progress)
        if self.name == "cosine":
            return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "cosine_with_restarts":
            phase = (progress * self.cycles) % 1.0
            return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * phase))
        return end + (1.0 - end) * (1.0 - progress) ** self.power


def warmup_from(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up steps given as a count or as a ratio of the run (the count wins when both are set)."""
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` should be 0 or more, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"`warmup_ratio` should be in [0, 1), got {warmup_ratio}")
    if warmup_steps:
        return min(warmup_steps, total_steps)
    return int(round(warmup_ratio * total_steps))
