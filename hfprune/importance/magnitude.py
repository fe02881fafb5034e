"""Magnitude baseline: the L1 (default) or squared-L2 norm of each group's slices."""

from __future__ import annotations

import torch

from .base import ImportanceCriterion, register_importance
from .weights import effective_weight


@register_importance("magnitude")
class MagnitudeImportance(ImportanceCriterion):
    name = "magnitude"
    needs = "nothing"
    work_buffers = 1  # |W|

    def __init__(self, p: int = 1):
        if p not in (1, 2):
            raise ValueError(f"p={p}: magnitude importance supports p=1 (L1) or p=2 (squared L2)")
        self.p = p

    def element_importance(self, module, rows) -> torch.Tensor:
        weight = effective_weight(module, rows)
        return weight.abs() if self.p == 1 else weight.pow(2)
