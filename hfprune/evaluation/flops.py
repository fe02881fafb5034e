"""Forward FLOPs per token of a Llama-like decoder, layer widths read from the weights.

Counted: every matrix multiply at ``2*m*n*k`` FLOPs — q, k, v, o projections,
gate, up and down projections, the LM head, and attention itself (``Q K^T``
and ``A V``). Not counted: norms, rotary embeddings, softmax, activations,
residual adds and biases; they are elementwise, a few percent at most, and
identical in kind for the dense and the pruned model.

Attention cost depends on how many keys a query sees. For a causal prefill of
``L`` tokens, the token at position ``t`` (1-based) sees ``t`` keys, so the
average is ``(L + 1) / 2``; a sliding-window layer of window ``W`` sees
``min(t, W)``. Per token and layer this gives
``2 * 2 * num_query_heads * head_dim * mean_keys`` (scores plus weighted sum);
under grouped-query attention the query heads, not the KV heads, set the cost.

The LM head is counted for every token, as in decoding; in a prefill that keeps
only the last logits it costs less, so the dense/pruned ratio here is a
slight underestimate of the prefill limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer; a pruned layer has fewer heads or channels."""

    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_window: int | None = None  # sliding-window size; None = full causal attention


@dataclass(frozen=True)
class DecoderWidths:
    """Everything the FLOP count needs: hidden size, vocabulary and per-layer widths."""

    hidden_size: int
    vocab_size: int
    layers: tuple[LayerWidths, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def mean_attended_keys(seq_len: int, window: int | None = None) -> float:
    """Average number of keys per query over a causal prefill of ``seq_len`` tokens."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 1")
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 1..W see t keys, the remaining L-W positions see W keys each
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def layer_flops(hidden_size: int, layer: LayerWidths, seq_len: int) -> dict[str, float]:
    """FLOPs per token of one decoder layer, by component."""
    h = hidden_size
    q_width = layer.num_query_heads * layer.head_dim
    kv_width = layer.num_kv_heads * layer.head_dim
    keys = mean_attended_keys(seq_len, layer.attention_window)
    return {
        "attention_proj": 2 * h * q_width + 2 * 2 * h * kv_width + 2 * q_width * h,
        "attention_scores": 2 * 2 * q_width * keys,
        "mlp": 3 * 2 * h * layer.intermediate_size,
    }


def flops_breakdown(widths: DecoderWidths, seq_len: int) -> dict[str, float]:
    """FLOPs per token by component, summed over layers, plus the LM head."""
    totals = {"attention_proj": 0.0, "attention_scores": 0.0, "mlp": 0.0}
    for layer in widths.layers:
        for key, value in layer_flops(widths.hidden_size, layer, seq_len).items():
            totals[key] += value
    totals["lm_head"] = 2 * widths.hidden_size * widths.vocab_size
    return totals


def flops_per_token(widths: DecoderWidths, seq_len: int) -> float:
    """Forward FLOPs per token, averaged over a causal prefill of ``seq_len`` tokens."""
    return sum(flops_breakdown(widths, seq_len).values())


def flops_speedup_limit(dense, pruned, seq_len: int) -> float:
    """``dense FLOPs / pruned FLOPs``: the speed-up a compute-bound run could reach.

    ``dense`` and ``pruned`` are :class:`DecoderWidths` or models (read with
    :func:`decoder_widths`).
    """
    if not isinstance(dense, DecoderWidths):
        dense = decoder_widths(dense)
    if not isinstance(pruned, DecoderWidths):
        pruned = decoder_widths(pruned)
    return flops_per_token(dense, seq_len) / flops_per_token(pruned, seq_len)


# ---------------------------------------------------------------- reading a model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a Llama-like model (also inside a PeftModel)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in module):
                return module
    raise ValueError(
        f"model {type(model).__name__}: no ModuleList of decoder layers with .self_attn and .mlp; "
        "supported are Llama-like decoders (Llama, Mistral, Qwen2/3, Gemma 2/3)"
    )


def _out_features(linear: torch.nn.Module) -> int:
    # nn.Linear, bitsandbytes Linear8bitLt and peft LoRA layers all expose out_features.
    if hasattr(linear, "out_features"):
        return int(linear.out_features)
    return int(linear.weight.shape[0])


def _head_dim(attn: torch.nn.Module, config) -> int:
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def _attention_window(config, index: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[index] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


def decoder_widths(model: torch.nn.Module) -> DecoderWidths:
    """Per-layer widths read from the actual ``nn.Linear`` shapes.

    Physically pruned models keep the original global config, so the config is
    consulted only for what pruning never changes (head_dim, sliding windows).
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    layers = []
    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = _head_dim(attn, config)
        layers.append(
            LayerWidths(
                num_query_heads=_out_features(attn.q_proj) // head_dim,
                num_kv_heads=_out_features(attn.k_proj) // head_dim,
                head_dim=head_dim,
                intermediate_size=_out_features(mlp.up_proj),
                attention_window=_attention_window(config, index),
            )
        )
    return DecoderWidths(
        hidden_size=int(model.get_input_embeddings().weight.shape[1]),
        vocab_size=_out_features(model.get_output_embeddings()),
        layers=tuple(layers),
    )
