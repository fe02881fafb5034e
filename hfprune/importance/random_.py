"""Random baseline: independent uniform scores, reproducible from a seed."""

from __future__ import annotations

import torch

from .base import ROLES, ImportanceCriterion, ModuleScores, register_importance


@register_importance("random")
class RandomImportance(ImportanceCriterion):
    name = "random"
    needs = "nothing"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score_layer(self, layer) -> ModuleScores:
        # A generator per layer keeps scores independent of the order layers are scored in.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer.index)
        sizes = {"head": layer.num_heads, "kv": layer.num_kv_heads, "channel": layer.intermediate_size}
        return {role: torch.rand(sizes[unit], generator=generator) for role, _, unit in ROLES}
