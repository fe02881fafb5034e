"""Reading (row blocks of) a projection's weight, gradient and LoRA factors, whatever wraps it."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from ..bnb4bit import dequantize_rows, is_4bit_linear
from ..structure import base_layer, is_lora_wrapped

ALL_ROWS = slice(None)


def dense_weight(module: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
    """Rows of the base weight in float32. An int8 `Linear8bitLt` weight is
    de-quantised with its per-row scales: `W = CB * SCB / 127`; a 4-bit `Linear4bit`
    one by bitsandbytes' `dequantize_4bit` with its quant state (never the packed bytes)."""
    inner = base_layer(module)
    weight = inner.weight
    if is_4bit_linear(inner):
        return dequantize_rows(weight, rows)
    if weight.dtype == torch.int8:
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = inner.state.SCB
        return weight.data[rows].float() * (scales[rows].float().view(-1, 1) / 127.0)
    return weight.data[rows].float()


def active_lora_factors(module: nn.Module) -> Iterator[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A, B, scale) of every active LoRA adapter on `module` (none if it is not LoRA-wrapped)."""
    if not is_lora_wrapped(module):
        return
    active = getattr(module, "active_adapters", None) or list(module.lora_A.keys())
    for name in active:
        if name in module.lora_A:
            yield module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])


def effective_weight(module: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
    """Rows of `W + scale * B @ A` over the active adapters: the weight the forward pass uses."""
    weight = dense_weight(module, rows)
    for lora_a, lora_b, scale in active_lora_factors(module):
        weight = weight + scale * (lora_b.data[rows].float() @ lora_a.data.float())
    return weight


def weight_gradient(module: nn.Module, rows: slice = ALL_ROWS) -> Optional[torch.Tensor]:
    grad = base_layer(module).weight.grad
    return None if grad is None else grad[rows].float()
