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

A short pruning stage can leave a cubic or linear ramp with almost no steps:
`max_steps=20` (10 pruning steps) with `prune_every=10` updates the masks at
step 1 (0%) and step 9 (100%), so the whole target goes in one jump. Such a
schedule is kept as asked and warned about (`coarse_ramp`, logged at the start
of training and printed by `hfprune plan`), naming the `prune_every` that gives
the ramp its steps: `prune_every` is the user's setting (LoRAPrune's 10), and
silently changing it would make the same config prune differently in
different runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

#: A cubic or linear ramp with fewer mask updates that remove something is, in effect, one shot.
MIN_RAMP_UPDATES = 3


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

    def removing_updates(self) -> list[int]:
        """The update steps that remove something (progress above 0)."""
        return [s for s in self.update_steps() if self.progress(s) > 0]

    def updates_text(self, steps: Optional[list[int]] = None, limit: int = 8) -> str:
        """'1 (0.0%), 3 (48.8%), ..., 9 (100.0%)': update steps (default: all) with the share of the target reached."""
        shown = [f"{s} ({self.progress(s):.1%})" for s in (self.update_steps() if steps is None else steps)]
        if len(shown) > limit:
            shown = shown[: limit // 2] + ["..."] + shown[-(limit - limit // 2 - 1):]
        return ", ".join(shown)

    def prune_every_for(self, updates: int = MIN_RAMP_UPDATES) -> Optional[int]:
        """The largest `prune_every` below this one that gives at least `updates` removing updates (None: none does)."""
        for prune_every in range(self.prune_every - 1, 0, -1):
            if len(replace(self, prune_every=prune_every).removing_updates()) >= updates:
                return prune_every
        return None

    def coarse_ramp(self) -> Optional[str]:
        """Why this cubic / linear schedule is in effect one shot, and what would make it a ramp; None when it
        has at least MIN_RAMP_UPDATES removing updates (or is one_shot on purpose)."""
        removing = self.removing_updates()
        if self.schedule == "one_shot" or len(removing) >= MIN_RAMP_UPDATES:
            return None
        jump = "in one jump, as one_shot would" if len(removing) == 1 else f"in {len(removing)} jumps"
        fix = self.prune_every_for()
        if fix is not None:
            better = replace(self, prune_every=fix)
            remedy = (f"prune_every={fix} removes it in {len(better.removing_updates())} updates, at steps "
                      f"{better.updates_text(better.removing_updates())}; "
                      "or lengthen the pruning stage (pruning_steps, pruning_fraction or max_steps)")
        else:
            remedy = "lengthen the pruning stage (pruning_steps, pruning_fraction or max_steps)"
        return (
            f"schedule={self.schedule!r} over a {self.total_steps}-step pruning stage with prune_every="
            f"{self.prune_every} updates the masks at steps {self.updates_text()} only: the target is removed {jump}, "
            f"not ramped. {remedy}; schedule='one_shot' says so on purpose"
        )

