"""LLM-Pruner's first- and second-order Taylor criteria, from full weight gradients.

    taylor        (element-1)   |W·g|
    taylor2       (element-2)   |W·g − ½·W²·F|   F = the Fisher diagonal (LLM-Pruner's `acc_grad`):
                                                 mean over backward passes of each pass's squared gradient
    param_second                W²·F             LLM-Pruner's pure second-order term
    vector                      |Σ_group W·g|    (signed sum over the group, then |·|)

g is the mean gradient over the calibration data (or the optimizer step). A backward pass for F is one
calibration sequence in `prune_model` (per-sample squares, as LLM-Pruner) and one micro-batch in
training (one backward per micro-batch is all a Trainer step runs); see `_FisherCriterion`.

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


class _FisherCriterion(TaylorImportance):
    """Keeps F, the Fisher diagonal of every scored weight, from the backward passes since the last scoring.

    A hook on each weight sees every backward pass's gradient `g_k` before it is accumulated into `.grad`, and
    F is the mean over the n passes of each pass's own mean-loss gradient squared (LLM-Pruner's `acc_grad`):

        prune_model (`loss_shares` False): each pass backpropagates its own mean loss, and the caller
            averages the gradients: F = Σ_k g_k² / n. A pass is one calibration sequence
            (`per_sample_gradients`), as LLM-Pruner loops over its examples: the per-sample empirical Fisher.
        training (`loss_shares` True, set by PruningCallback): a Trainer step runs one backward pass per
            micro-batch, on `loss / gradient_accumulation_steps` (or the token-normalised equivalent), so the
            passes are shares that sum to the step's gradient and `n·g_k` is micro-batch k's own mean-loss
            gradient: F = mean_k (n·g_k)² = n·Σ_k g_k². Gradients of single sequences never exist there; with
            one micro-batch per step F is the square of the step's gradient. (Clipping, applied after
            accumulation, does not touch F; the n·g_k are exact for equally many label tokens per micro-batch.)
    """

    per_sample_gradients = True
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
            if not self.enabled:
                return
            square = grad.detach().float().pow(2)
            self._squares[key] = square if key not in self._squares else self._squares[key].add_(square)
            self._counts[key] = self._counts.get(key, 0) + 1

        return hook

    def fisher(self, module, rows) -> Optional[torch.Tensor]:
        """Rows of F for `module`'s weight, or None if no backward pass reached it since the last scoring."""
        key = id(base_layer(module).weight)
        if key not in self._squares:
            return None
        passes = self._counts[key]
        return self._squares[key][rows] * (passes if self.loss_shares else 1.0 / passes)

    def score_layer(self, layer):
        scores = super().score_layer(layer)
        # The Fisher estimate covers the backward passes since the last scoring.
        for role, _, _ in ROLES:
            key = id(base_layer(layer.projection(role)).weight)
            self._squares.pop(key, None)
            self._counts.pop(key, None)
        return scores


@register_importance("taylor2")
class SecondOrderTaylorImportance(_FisherCriterion):
    """LLM-Pruner's element-2 (`param_mix`): `|W·g − ½·W²·F|`, g the mean gradient, F as in `_FisherCriterion`."""

    name = "taylor2"
    work_buffers = 3  # W·g, ½·W²·F and their difference

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        grad = weight_gradient(module, rows)
        fisher = self.fisher(module, rows)
        if grad is None or fisher is None:
            return None
        weight = effective_weight(module, rows)
        return (weight * grad - 0.5 * weight.pow(2) * fisher).abs()


@register_importance("param_second")
class FisherImportance(_FisherCriterion):
    """LLM-Pruner's pure second-order term (`param_second`, Optimal Brain Damage with the Fisher as the
    Hessian's diagonal): `W²·F`, F as in `_FisherCriterion`; the mean gradient is not used."""

    name = "param_second"
    work_buffers = 2  # W² and W²·F

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        fisher = self.fisher(module, rows)
        if fisher is None:
            return None
        return effective_weight(module, rows).pow(2) * fisher


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
