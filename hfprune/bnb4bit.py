"""bitsandbytes 4-bit (`Linear4bit`, NF4 / FP4) layers: reading, re-quantising and sizing them.

A `Linear4bit` weight is a `Params4bit`: the packed codes (two a byte, `[out*in/2, 1]`, flat over
the `[out, in]` matrix in row-major order) and a `QuantState` holding the logical shape, one absmax
per block of `blocksize` consecutive values (itself 8-bit quantised with double quantisation), the
code book, the quant type and the dtype it was quantised from. Everything here goes through
bitsandbytes' own `quantize_4bit` / `dequantize_4bit`; nothing reads the packed bytes as numbers.

The CPU inference kernel. On a CPU with AVX512-BF16, bitsandbytes 0.50 re-packs a `Linear4bit`
weight into another layout on its first forward in eval mode without gradients, and from then on
computes it in bfloat16. That kernel takes only `out_features % 32 == 0` and
`in_features % blocksize == 0` (else `N must be divisible by block_n`, `K must be even` or a reshape
error), and a layer once re-packed can no longer back-propagate (a TypeError in `MatMul4Bit`) --
so one evaluation would break the training that follows it, and pruned widths (67 channels) could
not run at all. `use_generic_cpu_kernels(model)` keeps hfprune's models on bitsandbytes' generic
path (de-quantise to the compute dtype, then a matmul), which takes every shape and trains after
an evaluation; a layer already re-packed is restored with bitsandbytes' own inverse (its absmax
keeps the bfloat16 rounding of the re-packed layout). GPUs never re-pack: nothing changes there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .quant_formats import QUANT_TYPES


def is_4bit_linear(module: nn.Module) -> bool:
    """bitsandbytes `Linear4bit` (and its `LinearNF4` / `LinearFP4` subclasses), without importing bitsandbytes."""
    return any(
        cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__
    )


def is_4bit_param(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "Params4bit" and getattr(tensor, "quant_state", None) is not None


def logical_shape(tensor: torch.Tensor) -> torch.Size:
    """The `[out, in]` shape a 4-bit parameter stands for (its own shape is the packed one); other tensors' shape."""
    if is_4bit_param(tensor):
        return torch.Size(tensor.quant_state.shape)
    return tensor.shape


def logical_numel(tensor: torch.Tensor) -> int:
    """How many weights a tensor holds: a packed 4-bit parameter counts its `[out, in]` values."""
    shape = logical_shape(tensor)
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _is_cpu_packed(weight) -> bool:
    return bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def check_4bit_linear(module: nn.Module, where: str) -> None:
    """A quantised `Linear4bit` in bitsandbytes' standard layout, with a quant type and block size it knows."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise TypeError(
            f"{where}: Linear4bit is not quantized yet (weight dtype {weight.dtype}); move it to its device "
            "(or load the model with a BitsAndBytesConfig) before pruning"
        )
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: 4-bit quant_type={state.quant_type!r}: hfprune supports {', '.join(QUANT_TYPES)}")
    if _is_cpu_packed(weight):
        raise TypeError(
            f"{where}: the 4-bit weight is in bitsandbytes' CPU inference layout; call "
            "hfprune.bnb4bit.use_generic_cpu_kernels(model) first"
        )
    shape = tuple(state.shape)
    if len(shape) != 2 or shape != (module.out_features, module.in_features):
        raise ValueError(
            f"{where}: the 4-bit weight stands for {list(shape)} but the layer is "
            f"{module.out_features} x {module.in_features} (out x in)"
        )


def use_generic_cpu_kernels(model: nn.Module) -> int:
    """Keep every `Linear4bit` of `model` off bitsandbytes' CPU re-packed inference kernel (see the module
    docstring); one already re-packed is restored with bitsandbytes' inverse. Returns the layers restored."""
    restored = 0
    for module in model.modules():
        if not is_4bit_linear(module):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight, "quant_state", None) is not None and _is_cpu_packed(weight):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            state = weight.quant_state
            nested = state.original_nested
            weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if not nested:  # bitsandbytes 0.50.2 restores the absmax of double quantization only
                state.absmax = state.absmax.T.reshape(-1).float().contiguous()
            weight.quant_state = module.quant_state = state
            restored += 1
    return restored


# bitsandbytes 0.50.2's native CPU `dequantize_4bit` (the one its CPU matmul uses) returns wrong values for an
# `in_features` that is a multiple of 16 but not of the block size (measured: every even width up to 400 with
# blocks of 32, 64 and 128 against its own generic implementation); widths it sends to the generic one (odd, or
# blocks of 2048 and more) are right.
CPU_KERNEL_WIDTH_MULTIPLE = 16
CPU_GENERIC_BLOCKSIZE = 2048


def cpu_dequantize_is_wrong(in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU kernel de-quantises a 4-bit matrix `in_features` wide wrongly (see above)."""
    return (blocksize < CPU_GENERIC_BLOCKSIZE and in_features % CPU_KERNEL_WIDTH_MULTIPLE == 0
            and in_features % blocksize != 0)


def cpu_width_rule(blocksize: int) -> str:
    return (f"on the CPU, a 4-bit layer's in_features must be a multiple of the block size {blocksize}, or not a "
            f"multiple of {CPU_KERNEL_WIDTH_MULTIPLE} (bitsandbytes 0.50's CPU kernel de-quantises other widths "
            "wrongly); GPUs take every width")


def check_cpu_in_features(module: nn.Module, in_features: int, where: str) -> None:
    """Refuse a 4-bit layer on the CPU `in_features` wide when bitsandbytes would compute it wrongly."""
    weight = module.weight
    if weight.device.type != "cpu":
        return
    blocksize = weight.quant_state.blocksize
    if cpu_dequantize_is_wrong(in_features, blocksize):
        raise ValueError(f"{where}: in_features={in_features}: {cpu_width_rule(blocksize)}")


# ---- reading ----------------------------------------------------------------------------------------------


def _packed_bytes(weight) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor (whatever `quant_storage` holds them)."""
    data = weight.data.contiguous()
    return (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)


def block_absmax(state) -> torch.Tensor:
    """The float32 absmax of every block, de-quantised first when it is double-quantised (as bitsandbytes does)."""
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def dequantize_rows(weight, rows: slice = slice(None)) -> torch.Tensor:
    """Rows of a 4-bit weight (a `Params4bit`), de-quantised by bitsandbytes (`dequantize_4bit`) to float32.

    When the rows start and end on block boundaries (every real model: `in_features` is a multiple of
    the block size) only their codes and absmax are read, so a row block costs its own size."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = weight.quant_state
    out_features, in_features = (int(s) for s in state.shape)
    start, stop, step = rows.indices(out_features)
    if step != 1:
        raise ValueError(f"rows={rows}: expected a contiguous slice")
    first, last = start * in_features, stop * in_features
    size = state.blocksize
    aligned = first % size == 0 and (last % size == 0 or last == out_features * in_features) and first % 2 == 0
    if not aligned:
        return dequantize_4bit(_packed_bytes(weight), _float32_state(state))[start:stop]
    codes = _packed_bytes(weight)[first // 2 : -(-last // 2)]
    absmax = block_absmax(state)[first // size : -(-last // size)]
    part = QuantState(absmax=absmax, shape=torch.Size((stop - start, in_features)), code=state.code,
                      blocksize=size, quant_type=state.quant_type, dtype=torch.float32)
    return dequantize_4bit(codes, part)


def _float32_state(state):
    """`state` with plain float32 absmax (double quantisation undone), de-quantising to float32."""
    from bitsandbytes.functional import QuantState

    return QuantState(absmax=block_absmax(state), shape=torch.Size(state.shape), code=state.code,
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.float32)


# ---- writing ----------------------------------------------------------------------------------------------


def quantize_like(module: nn.Module, dense: torch.Tensor):
    """A new `Params4bit` holding `dense` (`[out, in]`), quantised by bitsandbytes (`quantize_4bit`) with the
    layer's quant type, block size, double quantisation and storage dtype; its `quant_state` keeps the dtype
    the original was quantised from. The layer is not touched (see `set_4bit_weight`)."""
    from bitsandbytes.functional import quantize_4bit
    from bitsandbytes.nn import Params4bit

    weight = module.weight
    state = weight.quant_state
    packed, new_state = quantize_4bit(
        dense.float().contiguous(),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=getattr(weight, "quant_storage", torch.uint8),
    )
    new_state.dtype = state.dtype
    return Params4bit(
        packed,
        requires_grad=False,
        quant_state=new_state,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=getattr(weight, "quant_storage", torch.uint8),
        module=module,
        bnb_quantized=True,
    )


def set_4bit_weight(module: nn.Module, data: torch.Tensor, quant_state, out_features: int, in_features: int) -> None:
    """Point the layer's (same) `Params4bit` at new packed codes and quant state, with the widths they stand for.
    The Parameter object stays, so optimizer and hook references stay valid."""
    weight = module.weight
    weight.data = data
    weight.quant_state = quant_state
    module.quant_state = quant_state
    module.out_features, module.in_features = out_features, in_features


def quant_settings(module: nn.Module) -> Optional[dict]:
    """The layer's quantisation settings (quant type, block size, double quant, compute and storage dtype)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return None
    return {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "double_quant": bool(state.nested),
        "compute_dtype": getattr(module, "compute_dtype", None),
        "quant_storage": getattr(weight, "quant_storage", torch.uint8),
        "dtype": state.dtype,
    }
