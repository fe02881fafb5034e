"""`estimate_memory`: the peak of one pruning step, from shapes, settings and the criterion's cost."""

from __future__ import annotations

from collections.abc import Iterable

from ..structure.arch import PROJECTION_ROLES
from .activations import activations, forward_loss_buffers, forward_workspace
from .phases import components, forward_components, importance_workspace, phases
from .report import GiB, MemoryEstimate
from .settings import CriterionCost, Settings, check, dtype_name
from .shapes import model_shapes
from .storage import storage


def estimate_memory(
    config,
    criterion: str = "lora",
    load_in_8bit: bool | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    lora_r: int = 8,
    lora_target_modules: Iterable[str] = PROJECTION_ROLES,
    gradient_checkpointing: bool = True,
    compute_dtype: str = "bfloat16",
    optimizer: str | None = "adamw",
    *,
    load_in_4bit: bool = False,
    double_quant: bool = False,
    upcast_non_quantized: bool = True,
    lora_dropout: float = 0.0,
    attn_implementation: str | None = None,
    compensation: str = "auto",
    protected_layers: Iterable[int] | None = None,
) -> MemoryEstimate:
    """Peak memory of one pruning step (forward, backward, scoring, optimizer step).

    Args:
        config: a transformers config, a dict, a short name from ``hfprune/model_configs`` (see
            `available_model_configs`), a path or a hub id -- its model is built on the meta device
            and measured by `hfprune.structure.discover` --, a model, or a `ModelShapes`.
        criterion: a registered importance criterion (`hfprune.importance.available_importances`);
            what it costs is read from what it declares (`needs`, `work_buffers`,
            `weight_state_buffers`). Criteria that need full weight gradients (``taylor``,
            ``taylor2``, ``vector``) cannot score a quantized base.
        load_in_8bit: base decoder projections stored as bitsandbytes int8
            (``Linear8bitLt``: int8 weight + one fp32 scale per output row). The
            embeddings and the LM head stay unquantised (transformers skips the
            output embedding and tied weights). None: `PruningTrainer`'s default, 8-bit
            unless ``load_in_4bit`` or the criterion needs full weight gradients.
        seq_len, batch_size: tokens per step are ``seq_len * batch_size``.
        lora_r: LoRA rank (0 = no adapters); LoRA weights, gradients and optimizer
            states are fp32.
        lora_target_modules: projections that carry LoRA adapters.
        gradient_checkpointing: keep only each decoder layer's input and recompute.
        compute_dtype: dtype of the activations, of the weights when not quantized, and
            bitsandbytes' 4-bit compute dtype (``"float32"`` on CPU).
        optimizer: ``"adamw"`` (two fp32 states), ``"adamw_8bit"``, ``"sgd"``, ``None``;
            it holds the trainable parameters only (LoRA; full-gradient criteria
            score weights, they do not train them).
        load_in_4bit: base projections stored as bitsandbytes 4-bit (``Linear4bit``, NF4 or FP4:
            two codes per byte and an fp32 absmax per block of 64), de-quantised to
            ``compute_dtype`` for each matmul.
        double_quant: 4-bit with double quantization (``bnb_4bit_use_double_quant``): uint8 absmax
            with an fp32 scale per 256 blocks.
        upcast_non_quantized: with a quantized base, the unquantised weights are
            fp32, as peft's ``prepare_model_for_kbit_training`` leaves them. The fp32
            norms then promote the hidden states, and bitsandbytes' matmuls
            return their input's dtype, so the activations are fp32 as well.
        lora_dropout: LoRA dropout; above 0 each adapted module keeps its own
            dropped-out input and mask.
        attn_implementation: ``"sdpa"`` (memory-efficient kernels, no seq² buffer) or
            ``"eager"``; default: what transformers picks (eager for Gemma 2).
        compensation: `PruningConfig.compensation`; ``"auto"`` and ``"least_squares"`` keep the fp32 Gram
            matrices of every prunable layer's o_proj and down_proj inputs, which hfprune holds in host
            memory when the model is on a GPU: reported as `host_memory`, outside the peak.
        protected_layers: `PruningConfig.protected_layers` (None: the first 10% and the last layer); the
            other layers get Gram matrices.

    Raises:
        ValueError: a bad setting, or a full-gradient criterion on a quantized base.
    """
    cost = CriterionCost.of(criterion)
    if load_in_8bit is None:
        load_in_8bit = not load_in_4bit and not cost.full_gradients
    settings = Settings(
        criterion=criterion, load_in_8bit=bool(load_in_8bit), load_in_4bit=bool(load_in_4bit),
        double_quant=bool(double_quant), seq_len=seq_len, batch_size=batch_size, lora_r=lora_r,
        lora_target_modules=tuple(lora_target_modules) if lora_r else (),
        gradient_checkpointing=gradient_checkpointing, compute_dtype=dtype_name(compute_dtype),
        optimizer="none" if optimizer is None else optimizer, upcast_non_quantized=upcast_non_quantized,
        lora_dropout=lora_dropout, attn_implementation=attn_implementation, compensation=compensation,
        protected_layers=None if protected_layers is None else tuple(protected_layers),
    )
    check(settings, cost)
    shapes = model_shapes(config)
    attention = settings.attn_implementation or shapes.attention

    stored = storage(shapes, settings, cost)
    acts = activations(shapes, settings, cost, attention)
    if cost.forward_only:
        parts = forward_components(stored, acts, forward_workspace(shapes, settings, cost, attention),
                                   forward_loss_buffers(shapes, settings))
        step = {"forward passes (no grad)": parts}
    else:
        parts = components(stored, acts, importance_workspace(shapes, settings, cost))
        step = phases(parts, stored, acts)
    return MemoryEstimate(
        model=shapes.name,
        settings=settings.to_dict(attention),
        num_parameters=shapes.num_parameters,
        components=parts,
        phases=step,
        notes=_notes(settings, cost, attention, stored.weight_gradients),
        host_memory=host_memory(shapes, settings),
    )


def host_memory(shapes, settings: Settings) -> dict[str, int]:
    """What hfprune keeps in host memory beside the step when the model is on a GPU: compensation's Gram
    matrices (`PruningConfig(compensation="auto")` builds them whenever forward passes are seen)."""
    if settings.compensation == "none":
        return {}
    from ..compensation import layer_gram_bytes
    from ..structure.discovery import default_protected_layers

    count = len(shapes.layers)
    protected = (default_protected_layers(count) if settings.protected_layers is None
                 else {i % count for i in settings.protected_layers})
    return {"compensation_grams": sum(layer_gram_bytes(layer.query_width, layer.intermediate)
                                      for i, layer in enumerate(shapes.layers) if i not in protected)}


def _notes(s: Settings, cost: CriterionCost, attention: str, weight_gradients: int) -> tuple[str, ...]:
    notes = []
    if s.quantized and s.upcast_non_quantized:
        base = "4-bit" if s.load_in_4bit else "8-bit"
        notes.append(
            f"{base} base as prepared by peft's prepare_model_for_kbit_training: embeddings, LM head and "
            "norms in fp32, so the activations are fp32 too."
        )
    if s.load_in_4bit:
        notes.append(
            f"4-bit weights are de-quantised to {s.compute_dtype} one matrix at a time for each matmul "
            "(forward, and the input gradient in the backward)."
        )
    if attention == "eager":
        notes.append(f"eager attention keeps batch*heads*seq^2 probabilities (seq={s.seq_len}).")
    if cost.full_gradients:
        notes.append(f"{s.criterion!r} needs a gradient for every weight ({weight_gradients / GiB:.1f} GiB).")
    if cost.forward_only:
        notes.append(
            f"{s.criterion!r} scores in prune_model with forward passes of its own (no gradient, no optimizer): "
            f"the peak is one no-grad pass with labels over {s.batch_size} x {s.seq_len} tokens; the recovery "
            "fine-tuning that follows is a separate run (estimate it with its own criterion)."
        )
    return tuple(notes)


def compare_criteria(config, **kwargs) -> dict[str, MemoryEstimate]:
    """LoRAPrune's setting (``lora`` on an 8-bit base) against LLM-Pruner's (``taylor`` on bf16 weights).

    Other keyword arguments go to both `estimate_memory` calls; the model is measured once.
    """
    for name in ("criterion", "load_in_8bit", "load_in_4bit", "compute_dtype"):
        if name in kwargs:
            raise ValueError(f"compare_criteria sets {name!r} itself; got {name}={kwargs[name]!r}")
    shapes = model_shapes(config)
    return {
        "lora (8-bit)": estimate_memory(shapes, criterion="lora", load_in_8bit=True, **kwargs),
        "taylor (bf16)": estimate_memory(
            shapes, criterion="taylor", load_in_8bit=False, compute_dtype="bfloat16", **kwargs
        ),
    }
