"""LLM-Pruner's first- and second-order Taylor criteria, from full weight gradients.

    taylor   (element-1)   |W·g|
    taylor2  (element-2)   |W·g − ½·W²·F|,  F = mean over backward passes of g²
                                              (the Fisher diagonal, LLM-Pruner's `acc_grad`)
    vector                 |Σ_group W·g|     (signed sum over the group, then |·|)

They need the gradient of every base weight, so `prepare` unfreezes the
projections of the layers being scored. That costs a full-size gradient per
weight (about 80 GB for a 7B model in LLM-Pruner's setup) and is impossible on
an 8-bit base — exactly what the LoRA criterion avoids. They exist as faithful
baselines and for users who have the memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..structure import base_layer
from .base import ROLES, ImportanceCriterion, register_importance
from .weights import effective_weight, weight_gradient


def _unfreeze_base_weights(criterion_name: str, layers) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Make the projections of `layers` require gradients: (every weight, those this call unfroze)."""
    params = []
    for layer in layers:
        for role, _, _ in ROLES:
            weight = base_layer(layer.projection(role)).weight
            if weight.dtype == torch.int8 or not weight.is_floating_point():
                raise ValueError(
                    f"importance={criterion_name!r} needs full weight gradients, which an 8-bit (int8) base cannot "
                    "have; load the model in bf16/fp16/fp32 or use importance='lora', which scores an 8-bit base "
                    "from LoRA gradients"
                )
            params.append(weight)
    unfrozen = [weight for weight in params if not weight.requires_grad]
    for weight in unfrozen:
        weight.requires_grad_(True)
    return params, unfrozen


@register_importance("taylor")
class TaylorImportance(ImportanceCriterion):
    """`prepare` unfreezes the base projections; `release` freezes again those it unfroze, so recovery
    training does not pay for full weight gradients it no longer needs (weights a user trains stay trainable)."""

    name = "taylor"
    needs = "weight_gradients"
    work_buffers = 2  # W·g and its absolute value

    def __init__(self):
        self._unfrozen: list[torch.nn.Parameter] = []

    def prepare(self, model, layers) -> None:
        self.release()
        _, self._unfrozen = _unfreeze_base_weights(self.name, layers)

    def release(self) -> None:
        for weight in self._unfrozen:
            weight.requires_grad_(False)
            weight.grad = None
        self._unfrozen = []

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        grad = weight_gradient(module, rows)
        if grad is None:
            return None
        return (effective_weight(module, rows) * grad).abs()


@register_importance("taylor2")
class SecondOrderTaylorImportance(TaylorImportance):
    name = "taylor2"
    work_buffers = 3  # W·g, ½·W²·F and their difference
    weight_state_buffers = 1  # the Fisher diagonal of every scored weight, kept between scorings

    def __init__(self):
        super().__init__()
        self._squares: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._handles: list = []

    def prepare(self, model, layers) -> None:
        self.release()
        weights, self._unfrozen = _unfreeze_base_weights(self.name, layers)
        self._handles = [weight.register_hook(self._accumulate_square(weight)) for weight in weights]

    def release(self) -> None:
        super().release()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._squares.clear()
        self._counts.clear()

    def _accumulate_square(self, weight):
        key = id(weight)

        def hook(grad: torch.Tensor) -> None:
            # Called once per backward pass with that pass's gradient, before accumulation.
            square = grad.detach().float().pow(2)
            self._squares[key] = square if key not in self._squares else self._squares[key] + square
            self._counts[key] = self._counts.get(key, 0) + 1

        return hook

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        weight_param = base_layer(module).weight
        grad = weight_gradient(module, rows)
        key = id(weight_param)
        if grad is None or key not in self._squares:
            return None
        fisher = self._squares[key][rows] / self._counts[key]
        weight = effective_weight(module, rows)
        return (weight * grad - 0.5 * weight.pow(2) * fisher).abs()

    def score_layer(self, layer):
        scores = super().score_layer(layer)
        # The Fisher estimate covers the backward passes since the last scoring.
        for role, _, _ in ROLES:
            key = id(base_layer(layer.projection(role)).weight)
            self._squares.pop(key, None)
            self._counts.pop(key, None)
        return scores


@register_importance("vector")
class VectorTaylorImportance(TaylorImportance):
    name = "vector"
    # Signed element scores; the absolute value is taken once per group (see `signed`).
    signed = True
    work_buffers = 2

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        grad = weight_gradient(module, rows)
        if grad is None:
            return None
        return effective_weight(module, rows) * grad
