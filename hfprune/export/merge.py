"""The in-memory model as the tensors of a plain transformers checkpoint, LoRA deltas beside them.

`model_tensors(model)` walks a PreTrainedModel or a peft PeftModel (LoRA wrappers, an 8-bit
base, `modules_to_save` copies) and names every tensor as stock transformers would: no
`base_model.model.` prefix, no `.base_layer.`, no adapter weights. A LoRA-wrapped weight
carries its wrapper, so the export can add the delta `scale * B @ A` to whichever
full-precision weight it starts from: the in-memory one, or the original checkpoint's.

The in-memory LoRA A/B were sliced together with their base layer, so the delta already
has the pruned shape. It is computed in float32 and added in float32 before the merged
weight is cast to the export dtype, never added to de-quantised int8 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ..bnb4bit import logical_shape
from ..structure import base_layer, is_lora_wrapped, unwrap_model


@dataclass
class ModelTensor:
    """One tensor of the exported state dict, as the in-memory model holds it."""

    name: str  # the plain transformers name, e.g. model.layers.0.self_attn.q_proj.weight
    tensor: torch.Tensor
    lora: Optional[nn.Module] = None  # the LoRA wrapper whose delta belongs to this weight / bias
    role: str = ""  # "weight" or "bias" of a LoRA-wrapped layer
    trained_copy: bool = False  # a peft `modules_to_save` copy: trained, whatever its requires_grad says now

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the exported tensor: a packed 4-bit weight stands for its [out, in] matrix."""
        return tuple(logical_shape(self.tensor))

    @property
    def quantized(self) -> bool:
        """int8 (or packed 4-bit) values: only the original checkpoint has the full-precision weight."""
        return not (self.tensor.is_floating_point() or self.tensor.dtype == torch.bool)

    @property
    def from_memory(self) -> bool:
        """Exported from memory even when an original checkpoint is read: it may have been trained
        (requires_grad, or a `modules_to_save` copy). Frozen weights come from the original, and so do
        weights on the meta device (offloaded by a device_map, or a skeleton's): memory does not hold them."""
        trainable = self.trained_copy or bool(getattr(self.tensor, "requires_grad", False))
        return trainable and not self.quantized and self.tensor.device.type != "meta"


def _is_modules_to_save(module: nn.Module) -> bool:
    return type(module).__name__ == "ModulesToSaveWrapper" and hasattr(module, "modules_to_save")


def _is_auxiliary_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ in ("TrainableTokensWrapper", "AuxiliaryTrainingWrapper")


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def _walk(module: nn.Module, prefix: str, trained_copy: bool = False) -> Iterator[ModelTensor]:
    if is_lora_wrapped(module):
        check_mergeable(module, prefix.rstrip("."))
        for name, tensor in _own_tensors(base_layer(module)):
            yield ModelTensor(prefix + name, tensor, lora=module, role=name, trained_copy=trained_copy)
        return
    if _is_modules_to_save(module):
        if module.disable_adapters:
            yield from _walk(module.original_module, prefix, trained_copy)
        else:
            yield from _walk(module.modules_to_save[module.active_adapters[0]], prefix, trained_copy=True)
        return
    if _is_auxiliary_wrapper(module):
        raise TypeError(
            f"{prefix.rstrip('.')}: {type(module).__name__} cannot be exported as is; merge it first "
            "(peft `merge_and_unload()`), or train with plain LoRA / modules_to_save"
        )
    for name, tensor in _own_tensors(module):
        yield ModelTensor(prefix + name, tensor, trained_copy=trained_copy)
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.", trained_copy)


def model_tensors(model: nn.Module) -> dict[str, ModelTensor]:
    """Every tensor of the plain transformers state dict of `model`, by name, in module order.

    Tied weights appear under each of their names (the caller drops the tied copies).
    """
    inner = unwrap_model(model)
    return {t.name: t for t in _walk(inner, "")}


def check_mergeable(module: nn.Module, where: str) -> None:
    """Plain LoRA merges as `W + scale * B @ A`; variants (DoRA, ...) do not, and are refused."""
    variants = getattr(module, "lora_variant", {}) or {}
    used = [name for name in _adapters(module) if name in variants]
    if used or any(len(getattr(module, attr, {}) or {}) for attr in ("lora_magnitude_vector",)):
        raise TypeError(
            f"{where}: LoRA variant adapters {used or ['DoRA']} cannot be merged by hfprune's export; use plain LoRA"
        )


def _adapters(module: nn.Module) -> list[str]:
    """The adapters that take part in `module`'s forward: active, present, not disabled."""
    if getattr(module, "disable_adapters", False):
        return []
    active = module.active_adapters if hasattr(module, "active_adapters") else module.active_adapter
    if isinstance(active, str):
        active = [active]
    present = set(getattr(module, "lora_A", {}) or {}) | set(getattr(module, "lora_embedding_A", {}) or {})
    return [name for name in active if name in present]


def lora_weight_delta(module: nn.Module) -> Optional[torch.Tensor]:
    """`sum over active adapters of scale * B @ A`, in float32 on the CPU, laid out like the base weight."""
    delta = None
    for name in _adapters(module):
        if name in getattr(module, "lora_A", {}):
            a = module.lora_A[name].weight.detach().float().cpu()
            b = module.lora_B[name].weight.detach().float().cpu()
            # The same operations as peft's Linear.get_delta_weight, in float32.
            term = b @ a
            if getattr(module, "fan_in_fan_out", False):
                term = term.T
        else:  # embedding LoRA: A is [r, num_embeddings], B is [embedding_dim, r]
            a = module.lora_embedding_A[name].detach().float().cpu()
            b = module.lora_embedding_B[name].detach().float().cpu()
            term = (b @ a).T
        term = term * module.scaling[name]
        delta = term if delta is None else delta + term
    return delta


def lora_bias_delta(module: nn.Module) -> Optional[torch.Tensor]:
    """peft's `lora_bias=True`: B's bias times the scale is added to the base bias."""
    delta = None
    for name in _adapters(module):
        if not (getattr(module, "lora_bias", {}) or {}).get(name):
            continue
        bias = module.lora_B[name].bias
        if bias is None:
            continue
        term = bias.detach().float().cpu() * module.scaling[name]
        delta = term if delta is None else delta + term
    return delta


def lora_delta(entry: ModelTensor) -> Optional[torch.Tensor]:
    """The float32 delta LoRA adds to this tensor (None when it adds nothing)."""
    if entry.lora is None:
        return None
    if entry.role == "weight":
        return lora_weight_delta(entry.lora)
    if entry.role == "bias":
        return lora_bias_delta(entry.lora)
    return None


def is_merged_in_memory(entry: ModelTensor) -> bool:
    """peft's `merge()` already added the delta to the in-memory weight."""
    return entry.lora is not None and bool(getattr(entry.lora, "merged", False))


def merged_tensor(base: torch.Tensor, delta: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`base + delta` computed in float32 and cast to `dtype` (or `base` cast, when no delta)."""
    base = base.detach()
    if delta is None:
        return base.to(device="cpu", dtype=dtype)
    if tuple(delta.shape) != tuple(base.shape):
        raise ValueError(f"LoRA delta of shape {list(delta.shape)} does not fit the weight of shape {list(base.shape)}")
    return (base.to(device="cpu", dtype=torch.float32) + delta).to(dtype)
