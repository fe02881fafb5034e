"""The LoRA adapters hfprune adds when a model has none: LoRAPrune's rank 8 on every prunable projection.

The `lora` criterion reads the adapters of all seven projections, and a quantized base can only be
trained through adapters, so this one default serves the trainer, the recipes and the planner.
"""

from __future__ import annotations

from .structure.arch import PROJECTION_ROLES

DEFAULT_LORA_TARGETS = list(PROJECTION_ROLES)


def default_lora_config():
    """LoRAPrune's setting: rank 8 (alpha 16, dropout 0.05) on q/k/v/o and gate/up/down."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(DEFAULT_LORA_TARGETS),
                      task_type="CAUSAL_LM")
