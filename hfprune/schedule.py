"""Sparsity as a function of the optimizer step.

The pruning stage lasts `total_steps` optimizer steps. Nothing is removed
during the warm-up (scores accumulate); the sparsity then ramps from 0 to the
target between `first_step` and `last_step`, with a mask update every
`prune_every` steps and always one at `last_step`, where the target is reached
exactly (LoRAPrune's reference schedule can end one update short of it); the
cool-down trains with the final masks. Steps count completed optimizer steps
(`TrainerState.global_step`, starting at 1).

    cubic:     progress = 1 − (1 − t)^3   (LoRAPrune, after Zhu & Gupta 2017)
    linear:    progress = t
    one_shot:  a single update at `last_step`
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruningSchedule:
    total_steps: int
    schedule: str = "cubic"
    warmup_ratio: float = 0.1
    cooldown_ratio: float = 0.1
    prune_every: int = 10

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}: the pruning stage needs at least one optimizer step")
        if self.schedule not in ("cubic", "linear", "one_shot"):
            raise ValueError(f"schedule={self.schedule!r}: must be 'cubic', 'linear' or 'one_shot'")

    @property
    def first_step(self) -> int:
        return min(self.total_steps, max(1, round(self.warmup_ratio * self.total_steps)))

    @property
    def last_step(self) -> int:
        return max(self.first_step, self.total_steps - round(self.cooldown_ratio * self.total_steps))

    def progress(self, step: int) -> float:
        """Fraction of the final target reached after `step` optimizer steps."""
        if step >= self.last_step:
            return 1.0
        if self.schedule == "one_shot" or step < self.first_step:
            return 0.0
        t = (step - self.first_step) / (self.last_step - self.first_step)
        return t if self.schedule == "linear" else 1.0 - (1.0 - t) ** 3

    def is_update_step(self, step: int) -> bool:
        if step == self.last_step:
            return True
        if self.schedule == "one_shot" or not self.first_step <= step < self.last_step:
            return False
        return (step - self.first_step) % self.prune_every == 0

    def update_steps(self) -> list[int]:
        return [s for s in range(1, self.total_steps + 1) if self.is_update_step(s)]
