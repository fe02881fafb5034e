"""How much accelerator memory pruning a model takes, from its config alone.

`estimate_memory(config, ...)` counts every buffer a pruning step keeps alive --
the base weights as they are stored (int8 + row scales, or bf16), the LoRA
factors, their gradients and AdamW states, the activations saved for backward,
the loss, the transient work of the importance criterion -- and reports the
largest sum that is alive *at the same moment*. A training step goes through
four phases, and each has its own peak:

1. forward + loss backward: weights, optimizer states, every activation saved
   for backward, and the log-softmax of the logits with its gradient;
2. decoder backward: layer by layer, saved activations are released while
   gradients appear; one layer's recompute (gradient checkpointing), its
   de-quantised weight and its gradient temporaries are alive on top;
3. importance scoring (after backward, before the optimizer step): gradients and
   the criterion's per-module work buffers;
4. optimizer step: gradients, optimizer states and the optimizer's temporaries.

`MemoryEstimate.total` is the largest phase; `MemoryEstimate.phases` shows
what each one holds, so the numbers add up by construction.

Activations (bytes saved for backward, one decoder layer, T = batch * seq tokens,
`a` = activation bytes, h = hidden, I = intermediate, dq = heads * head_dim,
dkv = kv_heads * head_dim, n = heads, r = LoRA rank; read off
`transformers/models/llama/modeling_llama.py` and checked tensor by tensor with
`torch.autograd.graph.saved_tensors_hooks`, see `benchmarks/validate_estimator.py`):

    each RMSNorm          T*h*4      its input upcast to fp32 (pow and mul keep it)
                        + T*4        the rsqrt
                        + T*h*a      the normalised tensor, only if the norm weight trains
    q/k/v input           T*h*a      norm output, kept by bitsandbytes' int8 matmul, by
                                     LoRA's A and by a trainable Linear (one shared tensor)
    attention (SDPA)      T*(2*dq + 2*dkv)*a + T*n*4
                                     q and k after RoPE, v, the output (which is also
                                     o_proj's input) and the fp32 log-sum-exp; RoPE keeps
                                     only cos/sin. Eager attention (Gemma 2) keeps the
                                     repeated k/v and b*n*s*s*(4 + a [+ a with softcapping]).
    gate/up input         T*h*a      second norm output
    MLP                   T*4*I*a    gate output (SiLU/GELU input), activation output and
                                     up output (both factors of the product), the product
                                     (down_proj's input)
    LoRA                  T*r*a      A's output per adapted module (+ T*in*(a+1) with dropout)

For a Llama layer with LoRA on all 7 projections this is
`T*(4h + 2dq + 2dkv + 4I + 7r)*a + T*n*4 + 2*T*4` with the fp32 residual of
`prepare_model_for_kbit_training` (a = 4), or
`T*(2*4h + 2h*a + (2dq + 2dkv + 4I + 7r)*a) + T*n*4 + 2*T*4` in bf16 (a = 2),
where the norms keep their own fp32 copies.
With gradient checkpointing only each layer's input, `T*h*a`, is kept, and one
layer's set above is rebuilt during its backward. On top of a layer's saved set,
its backward holds `T*h*a + max(T*I*a + W, 2*T*I*a)`: the incoming gradient, then
down_proj's input gradient with its de-quantised int8 weight (W = out*in*a) or
its new weight gradient, or the gradients of both factors of the MLP product.

The loss keeps the fp32 log-softmax of the logits; its backward allocates the
gradient of the log-softmax and of the logits: `12*T*V` bytes (V = vocabulary),
plus `T*V*a` for the tanh of Gemma 2's final-logit softcapping.

The estimate is for the memory tensors occupy (`torch.cuda.max_memory_allocated`).
A GPU also needs the CUDA context and allocator slack; `MemoryEstimate.fits`
adds both. Not modelled: bitsandbytes' outlier columns (threshold 6.0; a few
columns of the input), kernel workspaces (cuBLAS, flash attention), and the
difference between an autocast run (SDPA in bf16) and the fp32 activations
assumed for an 8-bit base prepared for k-bit training.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

GiB = 1024**3

#: Folder with the published ``config.json`` of the supported large models.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

CRITERIA = ("lora", "taylor", "taylor2", "vector", "magnitude", "random")
#: Criteria that need the full gradient of every weight (LLM-Pruner's).
FULL_GRADIENT_CRITERIA = ("taylor", "taylor2", "vector")
#: Bytes of optimizer state per trainable parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "none": 0}
#: Bytes of optimizer temporaries per trainable parameter (torch's foreach AdamW
#: materialises one fp32 tensor list the size of the parameters).
OPTIMIZER_WORK_BYTES = {"adamw": 4, "adamw_8bit": 0, "sgd": 0, "none": 0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: fp32 work buffers the size of the largest scored weight matrix, per criterion:
#: LoRA: the estimated gradient G = dB·A + B·dA − dB·dA, the de-quantised
#: W + scale·B·A, and their product; Taylor: W·g and its absolute value;
#: second-order Taylor adds W²·E[g²]; magnitude: |W|.
IMPORTANCE_BUFFERS = {"lora": 3, "taylor": 2, "vector": 2, "taylor2": 3, "magnitude": 1, "random": 0}
#: Models whose attention keeps a per-head RMSNorm on q and k.
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3", "gemma3_text")
#: Models with four RMSNorms per decoder layer (pre/post attention and MLP) and
#: Gemma's fp32 "(1 + weight)" norm.
GEMMA_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")

COMPONENT_LABELS = {
    "base_weights": "base weights (decoder projections)",
    "other_weights": "embeddings, LM head, norms, biases",
    "lora_weights": "LoRA weights (fp32)",
    "optimizer_states": "optimizer states",
    "score_buffers": "pruning score buffers",
    "saved_activations": "activations saved for backward",
    "loss_buffers": "logits: log-softmax + gradients",
    "layer_backward_workspace": "one layer's backward (recompute, gradients, de-quantised weight)",
    "lora_gradients": "LoRA gradients (fp32)",
    "weight_gradients": "full weight gradients",
    "importance_workspace": "importance criterion work buffers",
    "optimizer_workspace": "optimizer step temporaries",
}
PERSISTENT = ("base_weights", "other_weights", "lora_weights", "optimizer_states", "score_buffers")


# ---------------------------------------------------------------------------
# configs


def available_model_configs() -> list[str]:
    """Short names of the configs shipped in ``hfprune/model_configs``."""
    if not MODEL_CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: Any):
    """A transformers config from a short name, a json file, a folder, a dict or a hub id.

    Short names are the files in ``hfprune/model_configs`` (``"llama-65b"``,
    ``"llama-2-70b"``, ...); anything else goes to ``AutoConfig.from_pretrained``.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return AutoConfig.for_model(**dict(name_or_path))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"config={name_or_path!r}: expected a PretrainedConfig, a dict, a short name, a path or a hub id"
        )
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return AutoConfig.from_pretrained(text)
    short = text.lower().removesuffix(".json")
    if (MODEL_CONFIG_DIR / f"{short}.json").is_file():
        config = AutoConfig.from_pretrained(str(MODEL_CONFIG_DIR / f"{short}.json"))
        config.name_or_path = short
        return config
    if "/" not in text:
        raise ValueError(
            f"config={text!r}: not a file, and not one of the shipped configs "
            f"{available_model_configs()}; pass a path, a hub id ('org/name') or a config"
        )
    return AutoConfig.from_pretrained(text)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Widths of one decoder layer (per-layer configs of pruned models differ)."""

    heads: int
    kv_heads: int
    intermediate: int


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """What the estimate needs to know about a decoder-only model."""

    model_type: str
    hidden: int
    head_dim: int
    vocab: int
    layers: tuple[_Layer, ...]
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    norms_per_layer: int
    gemma_norm: bool
    final_logit_softcap: bool
    attn_logit_softcap: bool
    default_attention: str

    def projections(self, layer: _Layer) -> dict[str, tuple[int, int, bool]]:
        """name -> (in_features, out_features, has_bias)."""
        h, dq, dkv, inter = self.hidden, layer.heads * self.head_dim, layer.kv_heads * self.head_dim, layer.intermediate
        return {
            "q_proj": (h, dq, self.qkv_bias),
            "k_proj": (h, dkv, self.qkv_bias),
            "v_proj": (h, dkv, self.qkv_bias),
            "o_proj": (dq, h, self.o_bias),
            "gate_proj": (h, inter, self.mlp_bias),
            "up_proj": (h, inter, self.mlp_bias),
            "down_proj": (inter, h, self.mlp_bias),
        }

    def largest_projection(self, names: Iterable[str] = PROJECTIONS) -> int:
        """out * in of the largest of the named projections over all layers."""
        names = tuple(names)
        sizes = [i * o for layer in self.layers for n, (i, o, _) in self.projections(layer).items() if n in names]
        return max(sizes, default=0)

    def num_parameters(self) -> int:
        return self.projection_parameters() + self.other_parameters()

    def projection_parameters(self) -> int:
        return sum(i * o for layer in self.layers for i, o, _ in self.projections(layer).values())

    def other_parameters(self) -> int:
        """Embeddings, LM head, norms and biases: what bitsandbytes leaves unquantised."""
        h, n_layers = self.hidden, len(self.layers)
        total = self.vocab * h * (1 if self.tied_embeddings else 2)
        total += (self.norms_per_layer * n_layers + 1) * h
        if self.qk_norm:
            total += 2 * self.head_dim * n_layers
        for layer in self.layers:
            total += sum(o for _, o, bias in self.projections(layer).values() if bias)
        return total


def _global_value(config, name: str):
    """A config attribute; for a heterogeneous (pruned) config, the first layer's value."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers refuses global access to per-layer attributes
        return _layer_value(config, 0, name)


def _layer_value(config, index: int, name: str):
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer:
        value = getattr(per_layer[index], name, None)  # falls back to the global value
        if value is not None:
            return value
    return getattr(config, name)


def _architecture(config) -> _Architecture:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [name for name in required if _global_value(text, name) is None]
    if missing:
        raise ValueError(
            f"config of model_type={model_type!r} lacks {missing}: the estimator covers decoder-only "
            "transformers with Llama-style attention and gated MLP (Llama, Mistral, Qwen2/3, Gemma 2/3)"
        )
    head_dim = _global_value(text, "head_dim") or text.hidden_size // _global_value(text, "num_attention_heads")
    layers = []
    for i in range(text.num_hidden_layers):
        n_heads = _layer_value(text, i, "num_attention_heads")
        kv = _layer_value(text, i, "num_key_value_heads") or n_heads
        layers.append(_Layer(heads=n_heads, kv_heads=kv, intermediate=_layer_value(text, i, "intermediate_size")))
    gemma = model_type in GEMMA_MODEL_TYPES
    qkv_bias = model_type == "qwen2" or bool(getattr(text, "attention_bias", False))
    return _Architecture(
        model_type=model_type,
        hidden=text.hidden_size,
        head_dim=head_dim,
        vocab=text.vocab_size,
        layers=tuple(layers),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        qkv_bias=qkv_bias,
        o_bias=bool(getattr(text, "attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        qk_norm=model_type in QK_NORM_MODEL_TYPES,
        norms_per_layer=4 if gemma else 2,
        gemma_norm=gemma,
        final_logit_softcap=getattr(text, "final_logit_softcapping", None) is not None,
        attn_logit_softcap=getattr(text, "attn_logit_softcapping", None) is not None,
        # SDPA refuses softcapping, so Gemma 2 runs eager attention.
        default_attention="eager" if getattr(text, "attn_logit_softcapping", None) is not None else "sdpa",
    )


# ---------------------------------------------------------------------------
# the estimate


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak accelerator memory of one pruning step, with what makes it up (bytes)."""

    model: str
    settings: dict[str, Any]
    num_parameters: int
    components: dict[str, int]
    """Every buffer at its largest."""
    phases: dict[str, dict[str, int]]
    """What is alive together at each phase's peak (parts of the components above)."""
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Bytes at the peak: the largest phase."""
        return max(sum(parts.values()) for parts in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def fits(self, gpu_bytes: float, *, context_bytes: float = 1 * GiB, fragmentation: float = 0.05) -> bool:
        """Whether the step fits a device of ``gpu_bytes``.

        Adds what tensors do not count: the CUDA context and kernels
        (``context_bytes``, about 0.5-1 GiB) and the caching allocator's slack
        (``fragmentation`` of the peak). Pass 0 for both to compare the bare peak.
        """
        if gpu_bytes <= 0:
            raise ValueError(f"gpu_bytes={gpu_bytes!r}: must be positive")
        return self.total * (1.0 + fragmentation) + context_bytes <= gpu_bytes

    def to_markdown(self) -> str:
        s = self.settings
        title = (
            f"**{self.model}** ({self.num_parameters / 1e9:.2f}B parameters): criterion `{s['criterion']}`, "
            f"{'8-bit' if s['load_in_8bit'] else s['compute_dtype']} base, seq {s['seq_len']} x batch "
            f"{s['batch_size']}, LoRA r={s['lora_r']}, gradient checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}"
        )
        lines = [title, "", "| component | GiB |", "|---|---:|"]
        for name, value in self.components.items():
            if value:
                lines.append(f"| {COMPONENT_LABELS.get(name, name)} | {value / GiB:.2f} |")
        lines += ["", "| phase | GiB |", "|---|---:|"]
        for name, parts in self.phases.items():
            mark = " (peak)" if name == self.peak_phase else ""
            lines.append(f"| {name}{mark} | {sum(parts.values()) / GiB:.2f} |")
        lines += ["", f"Peak: **{self.total_gib:.2f} GiB** ({self.total / 1e9:.1f} GB)."]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _dtype_name(value) -> str:
    name = str(value).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype={value!r}: must be one of {sorted(DTYPE_BYTES)}")
    return name


def _check_settings(criterion, seq_len, batch_size, lora_r, lora_target_modules, optimizer, attn_implementation,
                    lora_dropout):
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: must be one of {list(CRITERIA)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"lora_r={lora_r!r}: must be an integer >= 0 (0 = no LoRA adapters)")
    unknown = [m for m in lora_target_modules if m not in PROJECTIONS]
    if unknown:
        raise ValueError(f"lora_target_modules={list(lora_target_modules)!r}: {unknown} not among {list(PROJECTIONS)}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: must be one of {list(OPTIMIZER_STATE_BYTES)} or None")
    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: must be one of {list(ATTENTION_IMPLEMENTATIONS)} or None"
        )
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r}: must be in [0, 1)")
    if criterion == "lora" and (lora_r == 0 or not lora_target_modules):
        raise ValueError(
            f"criterion='lora' with lora_r={lora_r} and lora_target_modules={list(lora_target_modules)!r}: "
            "the LoRA criterion scores weights from LoRA gradients, so it needs lora_r >= 1 and target modules"
        )


def estimate_memory(
    config,
    criterion: str = "lora",
    load_in_8bit: bool = True,
    seq_len: int = 512,
    batch_size: int = 1,
    lora_r: int = 8,
    lora_target_modules: Iterable[str] = PROJECTIONS,
    gradient_checkpointing: bool = True,
    compute_dtype: str = "bfloat16",
    optimizer: str | None = "adamw",
    *,
    upcast_non_quantized: bool = True,
    lora_dropout: float = 0.0,
    attn_implementation: str | None = None,
) -> MemoryEstimate:
    """Peak memory of one pruning step (forward, backward, scoring, optimizer step).

    Args:
        config: a transformers config, a dict, a short name from
            ``hfprune/model_configs`` (see `available_model_configs`), a path or a hub id.
        criterion: importance criterion, one of `CRITERIA`. ``"taylor"``, ``"taylor2"``
            and ``"vector"`` need full weight gradients (no 8-bit base).
        load_in_8bit: base decoder projections stored as bitsandbytes int8
            (``Linear8bitLt``: int8 weight + one fp32 scale per output row). The
            embeddings and the LM head stay unquantised (transformers skips the
            output embedding and tied weights).
        seq_len, batch_size: tokens per step are ``seq_len * batch_size``.
        lora_r: LoRA rank (0 = no adapters); LoRA weights, gradients and optimizer
            states are fp32.
        lora_target_modules: projections that carry LoRA adapters.
        gradient_checkpointing: keep only each decoder layer's input and recompute.
        compute_dtype: dtype of the activations, and of the weights when not 8-bit
            (``"float32"`` on CPU).
        optimizer: ``"adamw"`` (two fp32 states), ``"adamw_8bit"``, ``"sgd"``, ``None``;
            it holds the trainable parameters only (LoRA; full-gradient criteria
            score weights, they do not train them).
        upcast_non_quantized: with an 8-bit base, the unquantised weights are
            fp32, as peft's ``prepare_model_for_kbit_training`` leaves them. The fp32
            norms then promote the hidden states, and bitsandbytes' int8 matmul
            returns its input's dtype, so the activations are fp32 as well.
        lora_dropout: LoRA dropout; above 0 each adapted module keeps its own
            dropped-out input and mask.
        attn_implementation: ``"sdpa"`` (memory-efficient kernels, no seq² buffer) or
            ``"eager"``; default: what transformers picks (eager for Gemma 2).

    Raises:
        ValueError: a bad setting, or a full-gradient criterion on an 8-bit base.
    """
    lora_target_modules = tuple(lora_target_modules) if lora_r else ()
    optimizer = "none" if optimizer is None else optimizer
    _check_settings(criterion, seq_len, batch_size, lora_r, lora_target_modules, optimizer, attn_implementation,
                    lora_dropout)
    compute_dtype = _dtype_name(compute_dtype)
    full_gradients = criterion in FULL_GRADIENT_CRITERIA
    if full_gradients and load_in_8bit:
        raise ValueError(
            f"criterion={criterion!r} with load_in_8bit=True: {criterion!r} scores weights from their full "
            "gradients, and bitsandbytes int8 weights are frozen (no .grad). Use load_in_8bit=False "
            "(bf16/fp16 weights that require grad), or criterion='lora', which estimates the weight "
            f"gradient from the LoRA factors. Valid criteria on an 8-bit base: "
            f"{[c for c in CRITERIA if c not in FULL_GRADIENT_CRITERIA]}"
        )

    cfg = load_model_config(config)
    arch = _architecture(cfg)
    model_name = str(getattr(cfg, "name_or_path", "") or arch.model_type)
    attention = attn_implementation or arch.default_attention
    tokens = seq_len * batch_size
    h, n_layers = arch.hidden, len(arch.layers)
    fp32 = 4

    # --- storage ---------------------------------------------------------
    weight_bytes = DTYPE_BYTES[compute_dtype]
    if load_in_8bit:
        other_bytes = fp32 if upcast_non_quantized else weight_bytes
        act = fp32 if upcast_non_quantized else weight_bytes
        # Linear8bitLt keeps the int8 matrix (CB) and one fp32 absmax per output row (SCB).
        base_weights = sum(
            i * o + o * fp32 for layer in arch.layers for i, o, _ in arch.projections(layer).values()
        )
    else:
        other_bytes = act = weight_bytes
        base_weights = arch.projection_parameters() * weight_bytes
    other_weights = arch.other_parameters() * other_bytes

    lora_params = sum(
        lora_r * (i + o)
        for layer in arch.layers
        for name, (i, o, _) in arch.projections(layer).items()
        if name in lora_target_modules
    )
    lora_weights = lora_params * fp32
    lora_gradients = lora_params * fp32
    optimizer_states = lora_params * OPTIMIZER_STATE_BYTES[optimizer]
    optimizer_workspace = lora_params * OPTIMIZER_WORK_BYTES[optimizer]

    # Full-gradient criteria: every weight requires grad, as in LLM-Pruner.
    grad_bytes = weight_bytes
    layer_grads = [
        (sum(i * o + (o if bias else 0) for i, o, bias in arch.projections(layer).values())
         + arch.norms_per_layer * h + (2 * arch.head_dim if arch.qk_norm else 0)) * grad_bytes
        for layer in arch.layers
    ] if full_gradients else [0] * n_layers
    head_grads = (arch.vocab * h + h) * grad_bytes if full_gradients and not arch.tied_embeddings else 0
    embed_grads = arch.vocab * h * grad_bytes if full_gradients else 0
    weight_gradients = sum(layer_grads) + head_grads + embed_grads

    score_buffers = sum(2 * (layer.heads + layer.intermediate) * fp32 for layer in arch.layers)
    if criterion == "taylor2":  # Fisher diagonal: one accumulator per prunable weight
        score_buffers += arch.projection_parameters() * grad_bytes

    # --- activations -------------------------------------------------------
    weights_train = full_gradients
    norm_keeps_output = weights_train  # a trainable norm weight needs the normalised tensor
    norm_output_bytes = fp32 if arch.gemma_norm else act  # Gemma multiplies in fp32, Llama after the cast

    def saves_input(name: str) -> bool:
        return load_in_8bit or weights_train or name in lora_target_modules

    def layer_saved(layer: _Layer) -> int:
        """Bytes one decoder layer keeps for backward without checkpointing."""
        t, i_size = tokens, layer.intermediate
        dq, dkv = layer.heads * arch.head_dim, layer.kv_heads * arch.head_dim
        norm = t * h * fp32 + t * fp32 + (t * h * norm_output_bytes if norm_keeps_output else 0)
        total = arch.norms_per_layer * norm
        if any(saves_input(n) for n in ("q_proj", "k_proj", "v_proj")):
            total += t * h * act
        if any(saves_input(n) for n in ("gate_proj", "up_proj")):
            total += t * h * act
        if saves_input("down_proj"):
            total += t * i_size * act
        total += 3 * t * i_size * act
        if arch.qk_norm:
            total += t * (dq + dkv) * fp32 + t * (layer.heads + layer.kv_heads) * fp32
            if norm_keeps_output:
                total += t * (dq + dkv) * act
        if attention == "sdpa":
            total += t * (2 * dq + 2 * dkv) * act + t * layer.heads * fp32
        else:
            kv_width = dq if layer.heads != layer.kv_heads else dkv
            probs = batch_size * layer.heads * seq_len * seq_len
            total += t * (dq + 2 * kv_width) * act
            total += probs * (fp32 + act + (act if arch.attn_logit_softcap else 0))
            if saves_input("o_proj"):
                total += t * dq * act  # the transposed copy of the output
        for name, (i, _, _) in arch.projections(layer).items():
            if name in lora_target_modules:
                total += t * lora_r * act
                if lora_dropout > 0:
                    total += t * i * (act + 1)
        return total

    full_layers = [layer_saved(layer) for layer in arch.layers]
    checkpoint_layers = [tokens * h * act] * n_layers
    rope = 2 * tokens * arch.head_dim * act
    mask = batch_size * seq_len * seq_len * act if attention == "eager" else 0
    # final norm (+ its normalised tensor, and the LM head's input, when they train)
    final = tokens * h * fp32 + tokens * fp32 + (tokens * h * (norm_output_bytes + act) if weights_train else 0)
    indices = tokens * 8 * (2 if weights_train else 1)  # int64 labels (+ token ids for the embedding gradient)
    outside_layers = rope + mask + final + indices
    kept_layers = checkpoint_layers if gradient_checkpointing else full_layers
    saved_activations = sum(kept_layers) + outside_layers

    loss_buffers = 12 * tokens * arch.vocab + (tokens * arch.vocab * act if arch.final_logit_softcap else 0)

    # One layer's backward, on top of its saved tensors: the gradient arriving from above
    # (T*h), then either down_proj's backward -- the gradient of its input (T*I) and its
    # de-quantised int8 weight, or its new weight gradient -- or the product's backward,
    # which holds the gradients of both factors while the product's own is released (2*T*I).
    max_intermediate = max(layer.intermediate for layer in arch.layers)
    if load_in_8bit:
        weight_work = arch.largest_projection() * act  # bitsandbytes de-quantises for the input gradient
    elif full_gradients:
        weight_work = arch.largest_projection() * grad_bytes  # this layer's gradients are not "done" yet
    else:
        weight_work = 0
    backward_temporaries = tokens * h * act + max(
        tokens * max_intermediate * act + weight_work, 2 * tokens * max_intermediate * act
    )
    recompute = max(full_layers) if gradient_checkpointing else 0
    layer_backward_workspace = recompute + backward_temporaries

    scored = lora_target_modules if criterion == "lora" else PROJECTIONS
    importance_workspace = IMPORTANCE_BUFFERS[criterion] * arch.largest_projection(scored) * fp32

    components = {
        "base_weights": base_weights,
        "other_weights": other_weights,
        "lora_weights": lora_weights,
        "optimizer_states": optimizer_states,
        "score_buffers": score_buffers,
        "saved_activations": saved_activations,
        "loss_buffers": loss_buffers,
        "layer_backward_workspace": layer_backward_workspace,
        "lora_gradients": lora_gradients,
        "weight_gradients": weight_gradients,
        "importance_workspace": importance_workspace,
        "optimizer_workspace": optimizer_workspace,
    }
    persistent = {name: components[name] for name in PERSISTENT}

    # Decoder backward runs from the last layer down: at layer l the gradients of the
    # LM head and of layers > l exist, the saved tensors of layers <= l do too.
    worst = None
    for index in range(n_layers):
        pending = sum(kept_layers[: index + 1]) + outside_layers
        done = head_grads + sum(layer_grads[index + 1:])
        if worst is None or pending + done > worst[0] + worst[1]:
            worst = (pending, done)
    pending_activations, done_gradients = worst
    gradients = {"lora_gradients": lora_gradients, "weight_gradients": weight_gradients}
    phases = {
        "forward + loss backward": {
            **persistent, "saved_activations": saved_activations, "loss_buffers": loss_buffers,
        },
        "decoder backward": {
            **persistent, "saved_activations": pending_activations, "weight_gradients": done_gradients,
            "lora_gradients": lora_gradients, "layer_backward_workspace": layer_backward_workspace,
        },
        "importance scoring": {**persistent, **gradients, "importance_workspace": importance_workspace},
        "optimizer step": {**persistent, **gradients, "optimizer_workspace": optimizer_workspace},
    }

    notes = []
    if load_in_8bit and upcast_non_quantized:
        notes.append(
            "8-bit base as prepared by peft's prepare_model_for_kbit_training: embeddings, LM head and "
            "norms in fp32, so the activations are fp32 too."
        )
    if attention == "eager":
        notes.append(f"eager attention keeps batch*heads*seq^2 probabilities (seq={seq_len}).")
    if full_gradients:
        notes.append(f"{criterion!r} needs a gradient for every weight ({weight_gradients / GiB:.1f} GiB).")

    settings = {
        "criterion": criterion, "load_in_8bit": load_in_8bit, "seq_len": seq_len, "batch_size": batch_size,
        "lora_r": lora_r, "lora_target_modules": lora_target_modules,
        "gradient_checkpointing": gradient_checkpointing, "compute_dtype": compute_dtype,
        "optimizer": optimizer, "upcast_non_quantized": upcast_non_quantized, "lora_dropout": lora_dropout,
        "attn_implementation": attention,
    }
    return MemoryEstimate(
        model=model_name,
        settings=settings,
        num_parameters=arch.num_parameters(),
        components=components,
        phases=phases,
        notes=tuple(notes),
    )


def compare_criteria(config, **kwargs) -> dict[str, MemoryEstimate]:
    """LoRAPrune's setting (``lora`` on an 8-bit base) against LLM-Pruner's (``taylor`` on bf16 weights).

    Other keyword arguments go to both `estimate_memory` calls.
    """
    for name in ("criterion", "load_in_8bit", "compute_dtype"):
        if name in kwargs:
            raise ValueError(f"compare_criteria sets {name!r} itself; got {name}={kwargs[name]!r}")
    config = load_model_config(config)
    return {
        "lora (8-bit)": estimate_memory(config, criterion="lora", load_in_8bit=True, **kwargs),
        "taylor (bf16)": estimate_memory(
            config, criterion="taylor", load_in_8bit=False, compute_dtype="bfloat16", **kwargs
        ),
    }


def comparison_markdown(estimates: Mapping[str, Mapping[str, MemoryEstimate]], gpu_bytes: float = 80e9) -> str:
    """A table of `compare_criteria` results, one row per model."""
    first = next(iter(estimates.values()))
    columns = list(first)
    header = "| model | parameters | " + " | ".join(f"{c} GiB | fits {gpu_bytes / 1e9:.0f} GB" for c in columns) + " |"
    lines = [header, "|---|---:|" + "---:|---|" * len(columns)]
    for model, row in estimates.items():
        cells = []
        for column in columns:
            estimate = row[column]
            cells += [f"{estimate.total_gib:.1f}", "yes" if estimate.fits(gpu_bytes) else "no"]
        lines.append(f"| {model} | {next(iter(row.values())).num_parameters / 1e9:.1f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)

