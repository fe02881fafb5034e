"""Exponential moving average of per-module scores across optimizer steps."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..structure import LayerStructure
from .base import GroupScores, ModuleScores, group_scores, normalize_module_scores, normalize_role_scores


class ScoreAccumulator:
    """EMA of each layer's per-module unit scores: `decay·old + (1 − decay)·new`.

    The first step initialises the average (no bias toward zero). A step whose
    scores contain a NaN or Inf anywhere is skipped entirely, so one overflowing
    step cannot poison the average (LoRAPrune skips such steps the same way).
    """

    def __init__(self, decay: float = 0.9, normalize="module", signed: bool = False):
        # normalize: "module" (each layer's modules, LoRAPrune), "global" (each role over all layers), "none";
        # True / False mean "module" / "none".
        if normalize is True or normalize is False:
            normalize = "module" if normalize else "none"
        if normalize not in ("module", "global", "none"):
            raise ValueError(f"normalize={normalize!r}: must be one of module, global, none")
        self.decay = decay
        self.normalize = normalize
        self.signed = signed
        self.scores: dict[int, ModuleScores] = {}
        self.num_updates = 0
        self.num_skipped = 0

    def update(self, step_scores: dict[int, ModuleScores]) -> bool:
        """Fold one step's scores in; returns False if the step was skipped as non-finite."""
        if not step_scores:
            return False
        if not all(torch.isfinite(s).all() for scores in step_scores.values() for s in scores.values()):
            self.num_skipped += 1
            return False
        step_scores = {index: {role: s.detach().float().cpu() for role, s in scores.items()}
                       for index, scores in step_scores.items()}
        if self.normalize == "global":
            step_scores = normalize_role_scores(step_scores)
        for index, scores in step_scores.items():
            if self.normalize == "module":
                scores = normalize_module_scores(scores)
            old = self.scores.get(index)
            if old is None or any(old[r].shape != s.shape for r, s in scores.items()):
                self.scores[index] = scores
            else:
                self.scores[index] = {r: self.decay * old[r] + (1 - self.decay) * s for r, s in scores.items()}
        self.num_updates += 1
        return True

    def group_scores(self, index: int, n_rep: int) -> Optional[GroupScores]:
        if index not in self.scores:
            return None
        groups = group_scores(self.scores[index], n_rep)
        if self.signed:
            groups = GroupScores(groups.heads.abs(), groups.kv_groups.abs(), groups.channels.abs())
        return groups

    def layer_scores(self, layers: Iterable[LayerStructure]) -> dict[int, GroupScores]:
        """Group scores of every layer in `layers` (what `allocate` reads). Raises when a layer has no
        score yet: every step so far had nothing to score or was skipped as non-finite."""
        out = {}
        for layer in layers:
            found = self.group_scores(layer.index, layer.n_rep)
            if found is None:
                raise RuntimeError(
                    f"no importance scores for layer {layer.index} yet ({self.num_updates} scored steps, "
                    f"{self.num_skipped} skipped as non-finite): the criterion must score at least one step "
                    "before groups can be chosen; check that the scoring data reaches the criterion (gradients "
                    "reach the LoRA layers, the loss is finite)"
                )
            out[layer.index] = found
        return out

    def reset(self) -> None:
        self.scores.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"scores.{i}.{role}": s for i, scores in self.scores.items() for role, s in scores.items()}
        out["scores.num_updates"] = torch.tensor(self.num_updates)
        out["scores.num_skipped"] = torch.tensor(self.num_skipped)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {}
        for key, value in state.items():
            parts = key.split(".")
            if key.startswith("scores.") and len(parts) == 3 and parts[1].isdigit():
                self.scores.setdefault(int(parts[1]), {})[parts[2]] = value.float().clone()
        self.num_updates = int(state.get("scores.num_updates", torch.tensor(0)))
        self.num_skipped = int(state.get("scores.num_skipped", torch.tensor(0)))
