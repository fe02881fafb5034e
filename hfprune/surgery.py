"""Physical removal: slice the weights so the model really becomes smaller.

One small function per layer type (`torch.nn.Linear`, bitsandbytes `Linear8bitLt` and
`Linear4bit`, peft LoRA wrappers around any of them), one walker (`remove_pruned_groups`).
Parameters are sliced *in place* (`param.data = ...`) so every reference to them — an
optimizer's param groups included — stays valid; the returned `SlicedParameter` records let
`slice_optimizer_state` transplant the optimizer's per-parameter state to the new shapes, so no
stale tensor is ever trained.

All or nothing. Everything that can be checked is checked before the first tensor changes
(masks, layer types, quantisation states, LoRA variants, the sizes a 4-bit layer may take).
Then every change goes through an `_Edits` journal that keeps what undoes it: for a slice, the
removed rows / columns only (the kept ones are the new tensor), so undoing needs no second copy
of the model; for a re-quantised 4-bit weight, the old packed codes and quant state (in CPU
memory when the weight is on an accelerator). If anything fails half-way, the journal is
unwound and every tensor and attribute is as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import bnb4bit
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


# ---- the journal --------------------------------------------------------------------------------------------


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[index.cpu()] = True
    return (~keep).nonzero().squeeze(1)


def _restore_sliced(kept: torch.Tensor, removed_part: torch.Tensor, dim: int, index: torch.Tensor,
                    removed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    full = kept.new_empty(shape)
    full.index_copy_(dim, index.to(kept.device), kept)
    full.index_copy_(dim, removed.to(kept.device), removed_part)
    return full


def _offloaded(tensor: torch.Tensor) -> torch.Tensor:
    """A copy to undo from, in CPU memory when `tensor` lives on an accelerator (GPU memory is the scarce one)."""
    return tensor if tensor.device.type in ("cpu", "meta") else tensor.to("cpu")


_MISSING = object()


class _Edits:
    """Every change surgery makes, each with its undo; `undo()` restores them all, newest first."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def set(self, obj, name: str, value) -> None:
        old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))

    def slice_tensor(self, holder, name: str, dim: int, index: torch.Tensor) -> None:
        """`holder.<name> = holder.<name>.index_select(dim, index)`, undone from the removed part alone."""
        self._undo.append(self._slice(holder, name, dim, index))

    @staticmethod
    def _slice(holder, name: str, dim: int, index: torch.Tensor) -> Callable[[], None]:
        old = getattr(holder, name)
        shape, device = old.shape, old.device
        removed = _complement(index, shape[dim])
        removed_part = old.index_select(dim, removed.to(device))
        new = old.index_select(dim, index.to(device)).contiguous()
        del old
        setattr(holder, name, new)

        def undo():
            setattr(holder, name, _restore_sliced(getattr(holder, name), removed_part, dim, index, removed, shape))

        return undo

    def slice_param(self, param: nn.Parameter, dim: int, index: torch.Tensor) -> SlicedParameter:
        """The data and its gradient: one edit, undone data first (a gradient must match its tensor's shape)."""
        undo_data = self._slice(param, "data", dim, index)
        undo_grad = self._slice(param, "grad", dim, index) if param.grad is not None else None

        def undo():
            undo_data()
            if undo_grad is not None:
                undo_grad()

        self._undo.append(undo)
        return SlicedParameter(param, dim, index)

    def set_4bit_weight(self, module: nn.Module, new_weight, out_features: int, in_features: int) -> None:
        weight = module.weight
        old = (_offloaded(weight.data), weight.quant_state, vars(module).get("quant_state", _MISSING),
               module.out_features, module.in_features)
        device = weight.data.device
        bnb4bit.set_4bit_weight(module, new_weight.data, new_weight.quant_state, out_features, in_features)

        def undo():
            data, weight_state, module_state, out_f, in_f = old
            bnb4bit.set_4bit_weight(module, data.to(device), weight_state, out_f, in_f)
            if module_state is _MISSING:  # transformers' loading leaves it unset
                del module.quant_state
            else:
                module.quant_state = module_state

        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


# ---- one layer type each ------------------------------------------------------------------------------------


def _slice_plain_linear_(edits: _Edits, module: nn.Linear, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    records = [edits.slice_param(module.weight, dim, index)]
    if dim == 0 and module.bias is not None:
        records.append(edits.slice_param(module.bias, 0, index))
    return records


def _int8_scales(module: nn.Module):
    weight, state = module.weight, module.state
    return weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB


def _slice_int8_linear_(edits: _Edits, module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """Slice the int8 weight and, for rows, its per-row scales. Dropping input
    columns keeps every remaining int8 value and its row scale, so the kept
    weights de-quantise to exactly the same numbers: no re-quantisation."""
    weight, state = module.weight, module.state
    holder = weight if getattr(weight, "CB", None) is not None else state
    records = [edits.slice_param(weight, dim, index)]
    edits.set(holder, "CB", weight.data)
    if dim == 0:
        scales_holder = weight if getattr(weight, "SCB", None) is not None else state
        edits.slice_tensor(scales_holder, "SCB", 0, index)
        if scales_holder is not holder:
            edits.set(holder, "SCB", scales_holder.SCB)
        if module.bias is not None:
            records.append(edits.slice_param(module.bias, 0, index))
    for cached in ("SB", "CBt", "SBt", "subB", "idx"):  # transposed/outlier caches of the old shapes
        if cached in vars(state):
            edits.set(state, cached, None)
    return records


def _slice_4bit_linear_(edits: _Edits, module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """De-quantise (bitsandbytes' `dequantize_4bit`), slice, re-quantise with the layer's quant type, block size,
    double quantisation and storage dtype. Whatever the block layout: blocks run over the flat `[out, in]`
    matrix, so removing columns (or rows, when `in_features` is no multiple of the block size) regroups them.
    Rows of a matrix whose rows are whole blocks come back exactly (double quantisation re-quantises the absmax)."""
    weight = module.weight
    dense = bnb4bit.dequantize_rows(weight).index_select(dim, index.to(weight.device))
    out_features, in_features = dense.shape
    new_weight = bnb4bit.quantize_like(module, dense)
    del dense
    edits.set_4bit_weight(module, new_weight, out_features, in_features)
    records = [SlicedParameter(weight, dim, index)]  # optimizer state of a frozen 4-bit weight: none to slice
    if dim == 0 and module.bias is not None:
        records.append(edits.slice_param(module.bias, 0, index))
    return records


def _is_lora_variant(module: nn.Module) -> bool:
    """DoRA and embedding LoRA carry tensors that plain row/column slicing does not cover."""
    return is_lora_wrapped(module) and any(
        len(getattr(module, name, {})) for name in ("lora_magnitude_vector", "lora_embedding_A")
    )


def _slice_lora_(edits: _Edits, module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """LoRA computes B(A(x)): input pruning slices A's columns, output pruning B's rows."""
    records = _slice_linear_(edits, module.base_layer, dim, index)
    adapters = module.lora_A if dim == 1 else module.lora_B
    for adapter in adapters.values():
        records.extend(_slice_plain_linear_(edits, adapter, dim, index))
        edits.set(adapter, "in_features" if dim == 1 else "out_features", len(index))
    inner = base_layer(module)
    edits.set(module, "in_features", inner.in_features)
    edits.set(module, "out_features", inner.out_features)
    return records


def _slice_linear_(edits: _Edits, module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    if is_lora_wrapped(module):
        return _slice_lora_(edits, module, dim, index)
    if bnb4bit.is_4bit_linear(module):
        return _slice_4bit_linear_(edits, module, dim, index)  # sets the widths with the new weight
    if is_int8_linear(module):
        records = _slice_int8_linear_(edits, module, dim, index)
    else:
        records = _slice_plain_linear_(edits, module, dim, index)
    edits.set(module, "out_features" if dim == 0 else "in_features", len(index))
    return records


# ---- checks before any change ---------------------------------------------------------------------------------


def check_sliceable(module: nn.Module, where: str, dim: int = 0, kept: int = 0) -> None:
    """Raise before any change if `module` cannot be sliced to keep `kept` rows (dim 0) / columns (dim 1)."""
    if dim not in (0, 1):
        raise ValueError(f"dim={dim}: must be 0 (output rows) or 1 (input columns)")
    if _is_lora_variant(module):
        raise TypeError(f"{where}: DoRA / embedding LoRA layers cannot be pruned; use plain LoRA")
    inner = base_layer(module)
    if bnb4bit.is_4bit_linear(inner):
        bnb4bit.check_4bit_linear(inner, where)
        if dim == 1 and kept:
            bnb4bit.check_cpu_in_features(inner, kept, where)
    elif is_int8_linear(inner):
        if inner.weight.dtype != torch.int8 or _int8_scales(inner) is None:
            raise TypeError(
                f"{where}: Linear8bitLt with weight dtype {inner.weight.dtype} is not quantized yet; move it to its "
                "device (or run one forward) before physical removal"
            )
    elif not isinstance(inner, nn.Linear):
        raise TypeError(
            f"{where}: cannot slice {type(inner).__name__}: expected nn.Linear, Linear8bitLt, Linear4bit or a LoRA "
            "wrapper"
        )


def slice_linear_(module: nn.Module, dim: int, index: torch.Tensor) -> list[SlicedParameter]:
    """Keep `index` rows (dim=0, outputs) or columns (dim=1, inputs) of a Linear-like module, in place,
    all or nothing."""
    check_sliceable(module, type(module).__name__, dim, len(index))
    edits = _Edits()
    try:
        return _slice_linear_(edits, module, dim, index)
    except BaseException:
        edits.undo()
        raise


def _slice_norm_(edits: _Edits, norm: nn.Module, index: torch.Tensor) -> list[SlicedParameter]:
    return [edits.slice_param(p, 0, index) for p in norm.parameters(recurse=False)]


# ---- one layer -----------------------------------------------------------------------------------------------


def _head_plan(layer: LayerStructure, heads_keep: torch.Tensor):
    kv_keep = heads_keep.view(layer.num_kv_heads, -1).any(dim=1)
    q_rows = head_rows(heads_keep.nonzero().squeeze(1), layer.head_dim)
    kv_rows = head_rows(kv_keep.nonzero().squeeze(1), layer.head_dim)
    return kv_keep, q_rows, kv_rows


def _check_layer(layer: LayerStructure, heads_keep: torch.Tensor, channels_keep: torch.Tensor) -> None:
    name = layer.spec.name
    if not bool(heads_keep.all()):
        kv_keep, q_rows, kv_rows = _head_plan(layer, heads_keep)
        check_sliceable(layer.projection("q_proj"), f"layer {layer.index} {name('q_proj')}", 0, len(q_rows))
        check_sliceable(layer.projection("o_proj"), f"layer {layer.index} {name('o_proj')}", 1, len(q_rows))
        if not bool(kv_keep.all()):
            for role in ("k_proj", "v_proj"):
                check_sliceable(layer.projection(role), f"layer {layer.index} {name(role)}", 0, len(kv_rows))
    if not bool(channels_keep.all()):
        kept = int(channels_keep.sum())
        for role in ("gate_proj", "up_proj"):
            check_sliceable(layer.projection(role), f"layer {layer.index} {name(role)}", 0, kept)
        check_sliceable(layer.projection("down_proj"), f"layer {layer.index} {name('down_proj')}", 1, kept)


def _remove_heads(edits: _Edits, layer: LayerStructure, heads_keep: torch.Tensor) -> list[SlicedParameter]:
    spec, attention = layer.spec, layer.attention
    kv_keep, q_rows, kv_rows = _head_plan(layer, heads_keep)
    records: list[SlicedParameter] = []
    records += _slice_linear_(edits, layer.projection("q_proj"), 0, q_rows)
    records += _slice_linear_(edits, layer.projection("o_proj"), 1, q_rows)
    for name in spec.per_head_q_norms:
        records += _slice_norm_(edits, getattr(attention, name), q_rows)
    if not bool(kv_keep.all()):
        records += _slice_linear_(edits, layer.projection("k_proj"), 0, kv_rows)
        records += _slice_linear_(edits, layer.projection("v_proj"), 0, kv_rows)
        for name in spec.per_head_kv_norms:
            records += _slice_norm_(edits, getattr(attention, name), kv_rows)
    num_heads, num_kv_heads = int(heads_keep.sum()), int(kv_keep.sum())
    # transformers' eager/sdpa attention repeat KV heads by this module attribute.
    edits.set(attention, "num_key_value_groups", num_heads // num_kv_heads)
    for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attention, attr):
            edits.set(attention, attr, value)
    return records


def _remove_channels(edits: _Edits, layer: LayerStructure, channels_keep: torch.Tensor) -> list[SlicedParameter]:
    index = channels_keep.nonzero().squeeze(1)
    records = _slice_linear_(edits, layer.projection("gate_proj"), 0, index)
    records += _slice_linear_(edits, layer.projection("up_proj"), 0, index)
    records += _slice_linear_(edits, layer.projection("down_proj"), 1, index)
    if hasattr(layer.mlp, "intermediate_size"):
        edits.set(layer.mlp, "intermediate_size", len(index))
    return records


# ---- the config ------------------------------------------------------------------------------------------------


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


def _layer_widths(structure: ModelStructure) -> dict[str, dict[str, int]]:
    config = structure.config
    return {
        str(layer.index): layer.widths()
        for layer in structure
        if layer.widths() != _reference_widths(config, layer.index)
    }


def record_layer_widths(structure: ModelStructure) -> dict[str, dict[str, int]]:
    """Write the per-layer widths into the config as `pruned_layer_widths` (only layers that differ)."""
    widths = _layer_widths(structure)
    structure.config.pruned_layer_widths = widths
    return widths


# ---- the model -------------------------------------------------------------------------------------------------


def remove_pruned_groups(structure: ModelStructure, masks: PruningMasks) -> list[SlicedParameter]:
    """Physically remove every group `masks` drops, all or nothing (see the module docstring)."""
    validate_masks(structure, masks)
    for layer in structure:
        for role in PROJECTION_ROLES:
            if _is_lora_variant(layer.projection(role)):
                raise TypeError(f"layer {layer.index} {role}: DoRA / embedding LoRA layers cannot be pruned; use plain LoRA")
    for layer in structure:
        _check_layer(layer, masks[layer.index].heads, masks[layer.index].channels)
    edits = _Edits()
    records: list[SlicedParameter] = []
    try:
        for layer in structure:
            mask = masks[layer.index]
            if not bool(mask.heads.all()):
                records += _remove_heads(edits, layer, mask.heads)
            if not bool(mask.channels.all()):
                records += _remove_channels(edits, layer, mask.channels)
        edits.set(structure.config, "pruned_layer_widths", _layer_widths(structure))
    except BaseException:
        edits.undo()
        raise
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
