"""LoRAPrune's criterion: importance from LoRA gradients, no weight gradient needed.

For a LoRA layer `W + s·B·A`, the optimizer step the LoRA gradients ask for
changes the effective weight by (for a unit learning rate)

    s·[(B − dB)(A − dA) − B·A] = −s·(dB·A + B·dA − dB·dA)

so `G = dB·A + B·dA − dB·dA` (LoRAPrune, eq. 6) stands in for the weight
gradient, and a group's importance is `Σ |G ⊙ (W + s·B·A)|` over its slices.

On the LoRA scale: `dA` and `dB` already carry the factor `s` (the chain rule
through `s·B·A`), and LoRAPrune's reference code multiplies `G` by nothing
else. We do the same: `G` is used exactly as above, and `s` enters only the
effective weight `W + s·B·A`. Per-module normalisation (the default) removes
any remaining common factor, so the ranking does not depend on `lora_alpha`.

With an 8-bit base, `W` is the de-quantised int8 weight (`CB · SCB / 127`).
The gradients are the ones the optimizer is about to use: accumulated over
gradient-accumulation micro-steps, after clipping, and all-reduced under DDP.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters import DEFAULT_LORA_TARGETS
from .base import ROLES, ImportanceCriterion, register_importance
from .weights import active_lora_factors, effective_weight


@register_importance("lora")
class LoRAImportance(ImportanceCriterion):
    name = "lora"
    needs = "lora_gradients"
    work_buffers = 3  # the estimate G, the effective weight W + s·B·A, their product

    def prepare(self, model, layers) -> None:
        missing = [
            f"layer {layer.index} {role}"
            for layer in layers
            for role, _, _ in ROLES
            if not list(active_lora_factors(layer.projection(role)))
        ]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(
                f"importance='lora' reads the LoRA factors of every prunable projection, but {shown} carry no LoRA "
                f"adapter; use LoraConfig(target_modules={DEFAULT_LORA_TARGETS}) or protect those layers"
            )

    def element_importance(self, module, rows) -> Optional[torch.Tensor]:
        estimate = None
        for lora_a, lora_b, _scale in active_lora_factors(module):
            if lora_a.grad is None or lora_b.grad is None:
                return None
            a, d_a = lora_a.data.float(), lora_a.grad.float()
            b, d_b = lora_b.data[rows].float(), lora_b.grad[rows].float()
            term = d_b @ a + b @ d_a - d_b @ d_a
            estimate = term if estimate is None else estimate + term
        if estimate is None:
            return None
        return (estimate * effective_weight(module, rows)).abs()
