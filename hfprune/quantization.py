"""A quantized base (bitsandbytes 8-bit `Linear8bitLt` or 4-bit `Linear4bit`): how to ask for one, and
what it allows, checked before any work.

* `bnb_config(...)` builds the `BitsAndBytesConfig` for `load_in_8bit` / `load_in_4bit` (QLoRA's
  defaults for 4 bits: NF4, double quantisation, bfloat16 compute) and `check_quantization_config`
  refuses what bitsandbytes would only reject after the download (8 and 4 bits together, a quant
  type other than nf4 / fp4, a compute dtype that is no float).
* `check_quantized_base(model, structure, config, criterion)`: a criterion that needs full weight
  gradients cannot score frozen integer codes; a 4-bit layer must be quantised in bitsandbytes'
  standard layout; on the CPU, every width a 4-bit layer has or can be pruned to must be one
  bitsandbytes computes right (`hfprune.bnb4bit.cpu_dequantize_is_wrong`). It also keeps 4-bit layers
  on bitsandbytes' generic CPU kernels (`hfprune.bnb4bit.use_generic_cpu_kernels`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import bnb4bit
from .structure import ModelStructure, base_layer, unwrap_model
from .surgery import is_int8_linear

from .quant_formats import COMPUTE_DTYPES, QUANT_TYPES  # noqa: F401  (named here too)
FULL_GRADIENT_ALTERNATIVES = "'lora', 'activation_taylor', 'activation', 'flap' or 'magnitude'"


def bnb_config(
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quant_type: str = "nf4",
    compute_dtype="bfloat16",
    double_quant: bool = True,
):
    """The `BitsAndBytesConfig` for one quantized base, or None for neither; 8 and 4 bits together are refused."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit=True and load_in_4bit=True: a base is quantized one way; choose one")
    if not (load_in_8bit or load_in_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=_dtype(compute_dtype),
        bnb_4bit_use_double_quant=double_quant,
    )
    check_quantization_config(config)
    return config


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"bnb_4bit_compute_dtype={value!r}: must be one of {', '.join(COMPUTE_DTYPES)}")
    return dtype


def check_quantization_config(config) -> None:
    """Refuse a bitsandbytes config hfprune cannot run, before anything is downloaded or loaded."""
    if config is None:
        return
    if isinstance(config, dict):
        get = config.get
    else:
        def get(name, default=None):
            return getattr(config, name, default)
    if get("load_in_8bit", False) and get("load_in_4bit", False):
        raise ValueError("quantization_config has load_in_8bit=True and load_in_4bit=True: choose one")
    if get("load_in_4bit", False):
        quant_type = get("bnb_4bit_quant_type", "fp4")
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type={quant_type!r}: bitsandbytes' 4-bit layers are {' or '.join(QUANT_TYPES)}"
            )
        _dtype(get("bnb_4bit_compute_dtype", None) or torch.float32)


def quantized_kind(model: nn.Module) -> Optional[str]:
    """"8-bit", "4-bit" or None: what the model's Linear layers hold (transformers' flags, else the layers)."""
    inner = unwrap_model(model)
    if getattr(inner, "is_loaded_in_4bit", False):
        return "4-bit"
    if getattr(inner, "is_loaded_in_8bit", False):
        return "8-bit"
    for module in inner.modules():
        if bnb4bit.is_4bit_linear(module):
            return "4-bit"
        if is_int8_linear(module):
            return "8-bit"
    return None


def check_criterion_fits_base(criterion, importance: str, kind: Optional[str]) -> None:
    """A full-gradient criterion (taylor, taylor2, param_second, vector) needs gradients of the base weights, which a
    quantized base (frozen integer codes) never has."""
    if kind is not None and criterion.needs_weight_gradients:
        raise ValueError(
            f"importance={importance!r} needs full weight gradients, which a {kind} base cannot have (its weights are "
            f"frozen quantized codes): load the model in bf16/fp32 (no quantization), or use importance="
            f"{FULL_GRADIENT_ALTERNATIVES}"
        )


def check_quantized_base(model: nn.Module, structure: ModelStructure, config, criterion) -> None:
    """Everything a quantized base must satisfy for `config`, before any forward pass (see the module docstring)."""
    kind = quantized_kind(model)
    check_criterion_fits_base(criterion, config.importance, kind)
    if kind != "4-bit":
        return
    inner = unwrap_model(model)
    bnb4bit.use_generic_cpu_kernels(inner)
    for name, module in inner.named_modules():
        if bnb4bit.is_4bit_linear(module):
            bnb4bit.check_4bit_linear(module, name)
            bnb4bit.check_cpu_in_features(module, module.in_features, name)
    _check_cpu_pruned_widths(structure, config)


def _reachable_widths(total: int, unit: int, multiple: int) -> set[int]:
    """Kept counts: `total` minus whole units, rounded to `multiple` (the allocation's rounding)."""
    return {kept for kept in range(total - unit, 0, -unit) if kept % multiple == 0}


def _check_cpu_pruned_widths(structure: ModelStructure, config) -> None:
    """On the CPU, no width the allocation may reach may be one bitsandbytes de-quantises wrongly."""
    for layer in structure.prunable_layers:
        spec = layer.spec
        checks = []
        if "channels" in config.structures:
            checks.append(("down_proj", _reachable_widths(layer.intermediate_size, 1, config.round_channels_to), 1,
                           "round_channels_to"))
        if "heads" in config.structures:
            unit = layer.n_rep if config.head_granularity == "kv_group" else layer.num_kv_heads
            heads = _reachable_widths(layer.num_heads, unit, config.round_heads_to)
            checks.append(("o_proj", heads, layer.head_dim, "round_heads_to"))
        for role, kept, per_unit, option in checks:
            inner = base_layer(layer.projection(role))
            if not bnb4bit.is_4bit_linear(inner) or inner.weight.device.type != "cpu":
                continue
            blocksize = inner.weight.quant_state.blocksize
            bad = sorted(k for k in kept if bnb4bit.cpu_dequantize_is_wrong(k * per_unit, blocksize))
            if bad:
                raise ValueError(
                    f"layer {layer.index} {spec.name(role)}: pruning may leave in_features={bad[-1] * per_unit} "
                    f"({option}={getattr(config, option)}): {bnb4bit.cpu_width_rule(blocksize)}; set {option} so "
                    f"that every kept width is a multiple of {blocksize} (e.g. {option}="
                    f"{blocksize // math.gcd(per_unit, blocksize)})"
                )
