"""Physical removal: slice the weights so the model really becomes smaller.

One small function per layer type (`torch.nn.Linear`, bitsandbytes
`Linear8bitLt`, peft LoRA wrappers around either), one walker
(`remove_pruned_groups`). Parameters are sliced *in place* (`param.data = ...`)
so every reference to them — an optimizer's param groups included — stays
valid; the returned `SlicedParameter` records let `slice_optimizer_state`
transplant the optimizer's per-parameter state to the new shapes, so no stale
tensor is ever trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .masking import PruningMasks, validate_masks
from .structure import PROJECTION_ROLES, LayerStructure, ModelStructure, base_layer, head_rows, is_lora_wrapped

def is_int8_linear(module: nn.Module) -> bool:
    """bitsandbytes `Linear8bitLt`, recognised without importing bitsandbytes (slow, noisy import)."""
    return type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes")


@dataclass
class SlicedParameter:
    """`param` kept `index` along `dim`."""

    param: nn.Parameter
    dim: int
    index: torch.Tensor


def _slice_param_(param: nn.Parameter, dim: int, index: torch.Tensor) -> SlicedParameter:
    index = index.to(param.device)
    param.data = param.data.index_select(dim, index).contiguous()
    if param.grad is not None:
        param.grad = param.grad.index_select(dim, index).contiguous()
    return SlicedParameter(param, dim, index)


def _slice_plain_linear_(module: nn.Linear, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    records = [_slice_param_(module.weight, dim, index)]
    if dim == 0 and module.bias is not None:
        records.append(_slice_param_(module.bias, 0, index))
    return records


def _slice_int8_linear_(module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """Slice the int8 weight and, for rows, its per-row scales. Dropping input
    columns keeps every remaining int8 value and its row scale, so the kept
    weights de-quantise to exactly the same numbers: no re-quantisation."""
    weight, state = module.weight, module.state
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
    if weight.dtype != torch.int8 or scales is None:
        raise TypeError(
            f"Linear8bitLt with weight dtype {weight.dtype} is not quantized yet; move it to its device "
            "(or run one forward) before physical removal"
        )
    records = [_slice_param_(weight, dim, index)]
    if dim == 0:
        scales = scales.index_select(0, index.to(scales.device)).contiguous()
        if module.bias is not None:
            records.append(_slice_param_(module.bias, 0, index))
    if getattr(weight, "CB", None) is not None:
        weight.CB = weight.data
        weight.SCB = scales
    else:
        state.CB = weight.data
        state.SCB = scales
    for cached in ("SB", "CBt", "SBt", "subB", "idx"):  # transposed/outlier caches of the old shapes
        if cached in vars(state):
            setattr(state, cached, None)
    return records


def _is_lora_variant(module: nn.Module) -> bool:
    """DoRA and embedding LoRA carry tensors that plain row/column slicing does not cover."""
    return is_lora_wrapped(module) and any(
        len(getattr(module, name, {})) for name in ("lora_magnitude_vector", "lora_embedding_A")
    )


def _slice_lora_(module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """LoRA computes B(A(x)): input pruning slices A's columns, output pruning B's rows."""
    if _is_lora_variant(module):
        raise TypeError(f"{type(module).__name__}: DoRA / embedding LoRA layers cannot be pruned; use plain LoRA")
    records = slice_linear_(module.base_layer, dim, index)
    adapters = module.lora_A if dim == 1 else module.lora_B
    for adapter in adapters.values():
        records.extend(_slice_plain_linear_(adapter, dim, index))
        if dim == 1:
            adapter.in_features = len(index)
        else:
            adapter.out_features = len(index)
    inner = base_layer(module)
    module.in_features, module.out_features = inner.in_features, inner.out_features
    return records


def slice_linear_(module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """Keep `index` rows (dim=0, outputs) or columns (dim=1, inputs) of a Linear-like module, in place."""
    if dim not in (0, 1):
        raise ValueError(f"dim={dim}: must be 0 (output rows) or 1 (input columns)")
    if is_lora_wrapped(module):
        return _slice_lora_(module, dim, index)
    if is_int8_linear(module):
        records = _slice_int8_linear_(module, dim, index)
    elif isinstance(module, nn.Linear):
        records = _slice_plain_linear_(module, dim, index)
    else:
        raise TypeError(f"cannot slice {type(module).__name__}: expected nn.Linear, Linear8bitLt or a LoRA wrapper")
    if dim == 0:
        module.out_features = len(index)
    else:
        module.in_features = len(index)
    return records


def _slice_norm_(norm: nn.Module, index: torch.Tensor) -> list[SlicedParameter]:
    return [_slice_param_(p, 0, index) for p in norm.parameters(recurse=False)]


def _remove_heads(layer: LayerStructure, heads_keep: torch.Tensor) -> list[SlicedParameter]:
    spec, attention = layer.spec, layer.attention
    num_kv = layer.num_kv_heads
    kv_keep = heads_keep.view(num_kv, -1).any(dim=1)
    q_rows = head_rows(heads_keep.nonzero().squeeze(1), layer.head_dim)
    kv_rows = head_rows(kv_keep.nonzero().squeeze(1), layer.head_dim)
    records: list[SlicedParameter] = []
    records += slice_linear_(layer.projection("q_proj"), 0, q_rows)
    records += slice_linear_(layer.projection("o_proj"), 1, q_rows)
    for name in spec.per_head_q_norms:
        records += _slice_norm_(getattr(attention, name), q_rows)
    if not bool(kv_keep.all()):
        records += slice_linear_(layer.projection("k_proj"), 0, kv_rows)
        records += slice_linear_(layer.projection("v_proj"), 0, kv_rows)
        for name in spec.per_head_kv_norms:
            records += _slice_norm_(getattr(attention, name), kv_rows)
    num_heads, num_kv_heads = int(heads_keep.sum()), int(kv_keep.sum())
    # transformers' eager/sdpa attention repeat KV heads by this module attribute.
    attention.num_key_value_groups = num_heads // num_kv_heads
    for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attention, attr):
            setattr(attention, attr, value)
    return records


def _remove_channels(layer: LayerStructure, channels_keep: torch.Tensor) -> list[SlicedParameter]:
    index = channels_keep.nonzero().squeeze(1)
    records = slice_linear_(layer.projection("gate_proj"), 0, index)
    records += slice_linear_(layer.projection("up_proj"), 0, index)
    records += slice_linear_(layer.projection("down_proj"), 1, index)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(index)
    return records


def _reference_widths(config, index: int) -> dict:
    """The config's widths for layer `index` (per-layer ones for a loaded heterogeneous checkpoint)."""
    source = config
    if getattr(config, "is_heterogeneous", False) and index in getattr(config, "per_layer_config", {}):
        source = config.per_layer_config[index]

    def read(name):
        try:
            return getattr(source, name, None)
        except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError on heterogeneous configs
            return None

    heads = read("num_attention_heads")
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": read("num_key_value_heads") or heads,
        "intermediate_size": read("intermediate_size"),
    }


def record_layer_widths(structure: ModelStructure) -> dict[str, dict[str, int]]:
    """Write the per-layer widths into the config as `pruned_layer_widths` (only layers that differ)."""
    config = structure.config
    widths = {
        str(layer.index): layer.widths()
        for layer in structure
        if layer.widths() != _reference_widths(config, layer.index)
    }
    config.pruned_layer_widths = widths
    return widths


def remove_pruned_groups(structure: ModelStructure, masks: PruningMasks) -> list[SlicedParameter]:
    """Physically remove every group `masks` drops. Validates everything before touching a weight."""
    validate_masks(structure, masks)
    for layer in structure:
        for role in PROJECTION_ROLES:
            if _is_lora_variant(layer.projection(role)):
                raise TypeError(f"layer {layer.index} {role}: DoRA / embedding LoRA layers cannot be pruned; use plain LoRA")
    records: list[SlicedParameter] = []
    for layer in structure:
        mask = masks[layer.index]
        if not bool(mask.heads.all()):
            records += _remove_heads(layer, mask.heads)
        if not bool(mask.channels.all()):
            records += _remove_channels(layer, mask.channels)
    record_layer_widths(structure)
    return records


def slice_optimizer_state(optimizer: torch.optim.Optimizer, records: list[SlicedParameter]) -> int:
    """Slice every per-parameter optimizer state tensor (e.g. Adam's moments) like its parameter.

    Returns the number of state tensors sliced. Scalar state (Adam's `step`) is kept.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    sliced = 0
    for record in records:
        state = optimizer.state.get(record.param)
        if not state:
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() > record.dim and value.shape != record.param.shape:
                state[key] = value.index_select(record.dim, record.index.to(value.device)).contiguous()
                sliced += 1
    return sliced
