"""Bytes of the activations a step keeps for backward, of the loss, and of one layer's backward.

Saved for backward by one decoder layer (T = batch * seq tokens, `a` = activation bytes,
h = hidden, I = intermediate, dq = heads * head_dim, dkv = kv_heads * head_dim, n = heads,
r = LoRA rank; read off `transformers/models/llama/modeling_llama.py` and checked tensor by tensor
with `torch.autograd.graph.saved_tensors_hooks`, see `benchmarks/validate_estimator.py`):

    each RMSNorm          T*h*4      its input upcast to fp32 (pow and mul keep it)
                        + T*4        the rsqrt
                        + T*h*a      the normalised tensor, only if the norm weight trains
    q/k/v input           T*h*a      norm output, kept by bitsandbytes' int8 matmul, by
                                     LoRA's A and by a trainable Linear (one shared tensor);
                                     bitsandbytes' 4-bit matmul keeps only its packed weight
    attention (SDPA)      T*(2*dq + 2*dkv)*a + T*n*4
                                     q and k after RoPE, v, the output (which is also
                                     o_proj's input) and the fp32 log-sum-exp; RoPE keeps
                                     only cos/sin. Eager attention (Gemma 2) keeps the
                                     repeated k/v and b*n*s*s*(4 + a [+ a with softcapping]).
    gate/up input         T*h*a      second norm output
    MLP                   T*3*I*a    gate output (SiLU/GELU input), activation output and
                                     up output (both factors of the product)
                        + T*I*a      the product, when down_proj keeps its input
    LoRA                  T*r*a      A's output per adapted module (+ T*in*(a+1) with dropout)

The probe of an `activation_gradients` criterion keeps the inputs of o_proj and down_proj for
its backward; it saves the very tensor the projection passes on (a view, one storage), so it
costs nothing when the projection keeps its input anyway (8-bit base, LoRA on it, trainable
weights) and T*I*a (down_proj; T*dq*a for o_proj under eager attention) when it does not.

For a Llama layer with LoRA on all 7 projections this is
`T*(4h + 2dq + 2dkv + 4I + 7r)*a + T*n*4 + 2*T*4` with the fp32 residual of
`prepare_model_for_kbit_training` (a = 4), or
`T*(2*4h + 2h*a + (2dq + 2dkv + 4I + 7r)*a) + T*n*4 + 2*T*4` in bf16 (a = 2),
where the norms keep their own fp32 copies.
With gradient checkpointing only each layer's input, `T*h*a`, is kept, and one
layer's set above is rebuilt during its backward. On top of a layer's saved set,
its backward holds `T*h*a + max(T*I*a + W, 2*T*I*a)`: the incoming gradient, then
down_proj's input gradient with its de-quantised weight (W = out*in*a for int8, out*in*2 in the
bf16 compute dtype for 4-bit) or its new weight gradient, or the gradients of both factors of
the MLP product. A hook criterion adds its own transient: `activation_taylor`'s backward
multiplies z by its gradient in fp32 blocks of up to 4096 tokens, and under checkpointing the
forward hooks of `activation` / `flap` run again in the recompute. (In the first forward those
hooks' blocks are smaller than the loss buffers below whenever the vocabulary is wider than the
MLP, so they never make the forward's peak.)

The loss keeps the fp32 log-softmax of the logits; its backward allocates the
gradient of the log-softmax and of the logits: `12*T*V` bytes (V = vocabulary),
plus `T*V*a` for the tanh of Gemma 2's final-logit softcapping.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import FP32, HOOKED_ROLES, CriterionCost, Settings
from .shapes import LayerShapes, ModelShapes
from .storage import BLOCKSIZE_4BIT


@dataclass(frozen=True)
class Activations:
    full_layers: tuple[int, ...]
    """What each decoder layer saves for backward without checkpointing."""
    kept_layers: tuple[int, ...]
    """What each layer keeps through the forward (only its input under checkpointing)."""
    outside_layers: int
    """RoPE's cos/sin, the attention mask, the final norm, the labels."""
    loss_buffers: int
    layer_backward_workspace: int
    """On top of the saved tensors during one layer's backward."""

    @property
    def saved(self) -> int:
        return sum(self.kept_layers) + self.outside_layers


def activations(shapes: ModelShapes, settings: Settings, cost: CriterionCost, attention: str) -> Activations:
    s = settings
    full_layers = tuple(layer_saved(layer, shapes, s, cost, attention) for layer in shapes.layers)
    checkpointed = tuple(s.tokens * shapes.hidden * s.activation_bytes for _ in shapes.layers)
    recompute = max(full_layers) if s.gradient_checkpointing else 0
    return Activations(
        full_layers=full_layers,
        kept_layers=checkpointed if s.gradient_checkpointing else full_layers,
        outside_layers=outside_layers(shapes, s, cost, attention),
        loss_buffers=loss_buffers(shapes, s),
        layer_backward_workspace=recompute + backward_temporaries(shapes, s, cost),
    )


def _saves_input(role: str, settings: Settings, cost: CriterionCost) -> bool:
    return (settings.load_in_8bit or cost.full_gradients or role in settings.lora_target_modules
            or (cost.probes_activations and role in HOOKED_ROLES))


def layer_saved(layer: LayerShapes, shapes: ModelShapes, settings: Settings, cost: CriterionCost,
                attention: str) -> int:
    """Bytes one decoder layer keeps for backward without checkpointing (see the module docstring)."""
    s, t, h, act = settings, settings.tokens, shapes.hidden, settings.activation_bytes
    inter, dq, dkv = layer.intermediate, layer.query_width, layer.kv_width
    norm_keeps_output = cost.full_gradients  # a trainable norm weight needs the normalised tensor
    norm_output_bytes = FP32 if shapes.fp32_norm_output else act

    def saves(role: str) -> bool:
        return _saves_input(role, s, cost)

    total = layer.norms * (t * h * FP32 + t * FP32 + (t * h * norm_output_bytes if norm_keeps_output else 0))
    if any(saves(role) for role in ("q_proj", "k_proj", "v_proj")):
        total += t * h * act
    if any(saves(role) for role in ("gate_proj", "up_proj")):
        total += t * h * act
    if saves("down_proj"):
        total += t * inter * act
    total += 3 * t * inter * act
    if layer.qk_norm:
        total += t * (dq + dkv) * FP32 + t * (layer.heads + layer.kv_heads) * FP32
        if norm_keeps_output:
            total += t * (dq + dkv) * act
    if attention == "sdpa":
        total += t * (2 * dq + 2 * dkv) * act + t * layer.heads * FP32
    else:
        kv_width = dq if layer.heads != layer.kv_heads else dkv
        probs = s.batch_size * layer.heads * s.seq_len * s.seq_len
        total += t * (dq + 2 * kv_width) * act
        total += probs * (FP32 + act + (act if shapes.attn_logit_softcap else 0))
        if saves("o_proj"):
            total += t * dq * act  # the transposed copy of the output
    for role, projection in layer.projections.items():
        if role in s.lora_target_modules:
            total += t * s.lora_r * act
            if s.lora_dropout > 0:
                total += t * projection.in_features * (act + 1)
    return total


def outside_layers(shapes: ModelShapes, settings: Settings, cost: CriterionCost, attention: str) -> int:
    s, t, h, act = settings, settings.tokens, shapes.hidden, settings.activation_bytes
    weights_train = cost.full_gradients
    norm_output_bytes = FP32 if shapes.fp32_norm_output else act
    rope = 2 * t * shapes.head_dim * act
    mask = s.batch_size * s.seq_len * s.seq_len * act if attention == "eager" else 0
    # final norm (+ its normalised tensor, and the LM head's input, when they train)
    final = t * h * FP32 + t * FP32 + (t * h * (norm_output_bytes + act) if weights_train else 0)
    indices = t * 8 * (2 if weights_train else 1)  # int64 labels (+ token ids for the embedding gradient)
    return rope + mask + final + indices


def loss_buffers(shapes: ModelShapes, settings: Settings) -> int:
    t = settings.tokens
    return 12 * t * shapes.vocab + (t * shapes.vocab * settings.activation_bytes if shapes.final_logit_softcap else 0)


def backward_temporaries(shapes: ModelShapes, settings: Settings, cost: CriterionCost) -> int:
    """One layer's backward, on top of its saved tensors: the gradient arriving from above (T*h),
    then the largest of: down_proj's backward -- the gradient of its input (T*I) and its de-quantised
    weight, or its new weight gradient --, the product's backward, which holds the gradients of both
    factors while the product's own is released (2*T*I), and the criterion's own transient."""
    s, t, act = settings, settings.tokens, settings.activation_bytes
    max_intermediate = max(layer.intermediate for layer in shapes.layers)
    largest = shapes.largest_projection()
    if s.load_in_8bit:
        weight_work = largest * act  # bitsandbytes de-quantises int8 for the input gradient
    elif s.load_in_4bit:
        # de-quantised to the compute dtype (double quantization: the absmax to fp32 first)
        weight_work = largest * s.weight_bytes + (-(-largest // BLOCKSIZE_4BIT) * FP32 if s.double_quant else 0)
    elif cost.full_gradients:
        weight_work = largest * s.weight_bytes  # this layer's gradients are not "done" yet
    else:
        weight_work = 0
    return t * shapes.hidden * act + max(
        t * max_intermediate * act + weight_work,
        2 * t * max_intermediate * act,
        criterion_transient(shapes, settings, cost),
    )


def criterion_transient(shapes: ModelShapes, settings: Settings, cost: CriterionCost) -> int:
    """fp32 blocks a hook criterion works in during a layer's backward (three of block x features:
    the product z*g or the centred inputs, and what is reduced from it; fp32 copies of bf16 inputs)."""
    from ..importance.activation import TOKEN_BLOCK

    s = settings
    features = max(max(layer.intermediate, layer.query_width) for layer in shapes.layers)
    if cost.probes_activations:  # in the probe's backward, next to the incoming gradient of z
        sequences = min(s.batch_size, max(1, TOKEN_BLOCK // s.seq_len))
        return s.tokens * features * s.activation_bytes + 3 * sequences * s.seq_len * features * FP32
    if cost.hooked and s.gradient_checkpointing:  # the forward hooks run again in the recompute
        return 3 * min(s.tokens, TOKEN_BLOCK) * features * FP32
    return 0


def forward_workspace(shapes: ModelShapes, settings: Settings, cost: CriterionCost, attention: str) -> int:
    """One layer of a no-grad forward pass: its input and the largest of attention's q/k/v (with eager
    attention's probabilities) and the MLP's gate, up and activation outputs (one of them then becomes the
    product, masked for down_proj), and a hook criterion's fp32 blocks."""
    from ..importance.activation import TOKEN_BLOCK

    s, t, act = settings, settings.tokens, settings.activation_bytes
    largest = 0
    for layer in shapes.layers:
        attention_bytes = t * (layer.query_width + 2 * layer.kv_width) * act
        if attention == "eager":
            attention_bytes += s.batch_size * layer.heads * s.seq_len * s.seq_len * (FP32 + act)
        largest = max(largest, attention_bytes, 3 * t * layer.intermediate * act)
    features = max(max(layer.intermediate, layer.query_width) for layer in shapes.layers)
    hooks = 3 * min(t, TOKEN_BLOCK) * features * FP32 if cost.hooked else 0
    return t * shapes.hidden * act + max(largest, hooks)


def forward_loss_buffers(shapes: ModelShapes, settings: Settings) -> int:
    """The logits, their fp32 copy and its log-softmax (the loss without a backward)."""
    return settings.tokens * shapes.vocab * (settings.activation_bytes + 2 * FP32)
