"""Counting parameters: what pruning removed, as a fraction of what it could remove and of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bnb4bit import logical_numel
from .masking import PruningMasks
from .structure import ModelStructure


@dataclass
class SparsityReport:
    prunable_params: int
    removed_params: int
    total_params: int

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable decoder parameters removed."""
        return self.removed_params / max(1, self.prunable_params)

    @property
    def total_sparsity(self) -> float:
        """Fraction of all model parameters removed."""
        return self.removed_params / max(1, self.total_params)

    @property
    def remaining_params(self) -> int:
        return self.total_params - self.removed_params

    def as_dict(self) -> dict:
        return {
            "prunable_params": self.prunable_params,
            "removed_params": self.removed_params,
            "remaining_params": self.remaining_params,
            "total_params": self.total_params,
            "sparsity": self.sparsity,
            "total_sparsity": self.total_sparsity,
        }


def removed_params(structure: ModelStructure, masks: PruningMasks) -> int:
    """Parameters the masks remove from `structure`'s layers (at their current widths)."""
    removed = 0
    for layer in structure:
        mask = masks[layer.index]
        removed += (layer.num_heads - int(mask.heads.sum())) * layer.params_per_query_head
        removed += (layer.num_kv_heads - int(mask.kv_groups(layer.num_kv_heads).sum())) * layer.params_per_kv_head
        removed += (layer.intermediate_size - int(mask.channels.sum())) * layer.params_per_channel
    return removed


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the base model, LoRA adapters excluded (a packed 4-bit weight counts its [out, in] values)."""
    return sum(logical_numel(p) for name, p in model.named_parameters() if "lora_" not in name)
