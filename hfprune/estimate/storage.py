"""Bytes of what a pruning step stores: weights as they are kept, LoRA, optimizer, gradients, scores.

How bitsandbytes keeps a base projection of ``n = out * in`` weights (read off bitsandbytes 0.50
``Int8Params`` / ``Params4bit`` and ``QuantState``, and counted on real layers in the tests):

    8-bit (Linear8bitLt)   int8 matrix CB (n bytes) + one fp32 absmax per output row (SCB)
    4-bit (Linear4bit)     two 4-bit codes per byte (n/2) + one fp32 absmax per block of 64,
                           + the 16-value fp32 code book of NF4/FP4;
                           with double quantization the absmax are uint8, with one fp32 absmax
                           per 256 of them, an fp32 offset and a 256-value fp32 code book
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import FP32, OPTIMIZER_STATE_BYTES, OPTIMIZER_WORK_BYTES, CriterionCost, Settings
from .shapes import ModelShapes, Projection

#: bitsandbytes' 4-bit layout (transformers' default bnb_4bit_quant_storage=uint8).
BLOCKSIZE_4BIT = 64
CODE_4BIT = 16 * FP32
NESTED_BLOCKSIZE = 256
NESTED_CODE = 256 * FP32
#: Float64 running sums per input feature that a hook criterion keeps for o_proj and down_proj
#: (a count aside: the mean and the squared deviations of `activation` / `flap`; the per-unit
#: |mean| and square sums of `activation_taylor` are fewer).
HOOK_STATISTICS = 2 * 8


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def quantized_4bit_bytes(projection: Projection, double_quant: bool) -> int:
    """Bytes bitsandbytes keeps for one 4-bit weight and its quantization state."""
    n = projection.size
    blocks = _ceil(n, BLOCKSIZE_4BIT)
    if double_quant:
        absmax = blocks + _ceil(blocks, NESTED_BLOCKSIZE) * FP32 + FP32 + NESTED_CODE
    else:
        absmax = blocks * FP32
    return _ceil(n, 2) + absmax + CODE_4BIT


def base_projection_bytes(projection: Projection, settings: Settings) -> int:
    """One base projection weight as stored (its bias counts with the other weights)."""
    if settings.load_in_4bit:
        return quantized_4bit_bytes(projection, settings.double_quant)
    if settings.load_in_8bit:
        return projection.size + projection.out_features * FP32
    return projection.size * settings.weight_bytes


@dataclass(frozen=True)
class Storage:
    """Bytes of each stored thing at its largest."""

    base_weights: int
    other_weights: int
    lora_parameters: int
    optimizer_states: int
    optimizer_workspace: int
    score_buffers: int
    layer_gradients: tuple[int, ...]
    """Full-gradient criteria: each decoder layer's weight gradients."""
    head_gradients: int
    """... the LM head's and the final norm's (none when the head is the tied embedding)."""
    embedding_gradients: int

    @property
    def lora_weights(self) -> int:
        return self.lora_parameters * FP32

    @property
    def lora_gradients(self) -> int:
        return self.lora_parameters * FP32

    @property
    def weight_gradients(self) -> int:
        return sum(self.layer_gradients) + self.head_gradients + self.embedding_gradients


def storage(shapes: ModelShapes, settings: Settings, cost: CriterionCost) -> Storage:
    s = settings
    other_bytes = FP32 if s.quantized and s.upcast_non_quantized else s.weight_bytes
    lora_parameters = sum(
        s.lora_r * (p.in_features + p.out_features)
        for layer in shapes.layers for role, p in layer.projections.items() if role in s.lora_target_modules
    )
    # Full-gradient criteria: every weight requires grad, as in LLM-Pruner.
    grad = s.weight_bytes if cost.full_gradients else 0
    return Storage(
        base_weights=sum(base_projection_bytes(p, s) for layer in shapes.layers for p in layer.projections.values()),
        other_weights=shapes.other_parameters() * other_bytes,
        lora_parameters=lora_parameters,
        optimizer_states=lora_parameters * OPTIMIZER_STATE_BYTES[s.optimizer],
        optimizer_workspace=lora_parameters * OPTIMIZER_WORK_BYTES[s.optimizer],
        score_buffers=score_buffers(shapes, settings, cost),
        layer_gradients=tuple(layer.parameters * grad for layer in shapes.layers),
        head_gradients=0 if shapes.tied_embeddings else (shapes.vocab * shapes.hidden + shapes.hidden) * grad,
        embedding_gradients=shapes.vocab * shapes.hidden * grad,
    )


def score_buffers(shapes: ModelShapes, settings: Settings, cost: CriterionCost) -> int:
    """The score accumulator (EMA and the current step, fp32, per query head and per channel),
    the criterion's per-weight state (taylor2's Fisher diagonal) and a hook criterion's statistics."""
    total = sum(2 * (layer.heads + layer.intermediate) * FP32 for layer in shapes.layers)
    total += cost.weight_state_buffers * shapes.projection_parameters() * settings.weight_bytes
    if cost.hooked:
        total += sum((layer.query_width + layer.intermediate) * HOOK_STATISTICS for layer in shapes.layers)
    return total
