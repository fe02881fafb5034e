"""Compensation: the kept input features of o_proj / down_proj absorb what the removed ones did.

A query head reaches the layer output only through its `head_dim` input
columns of `o_proj`, an MLP channel only through its input column of
`down_proj`. With `x` such a projection's input, `K` the kept and `R` the
removed features, the output `W x = W_K x_K + W_R x_R` loses `W_R x_R` when the
group goes. Two ways to give most of it back:

least squares (SlimGPT, ZipLM, SparseGPT's column update)
    Choose the update `Δ` of the kept columns that best reproduces the unpruned
    output over the tokens seen, with a ridge on the update's size:

        min_Δ  Σ_t ‖W_R x_R,t − Δ x_K,t‖² + λ ‖Δ‖²
        Δ = W_R M,   M = Σ_RK (Σ_KK + λI)⁻¹,   Σ = Σ_t x_t x_tᵀ

    so `W_K' = W_K + W_R M`. `M` depends on the input statistics only, never on
    the weight, which is why the same `M` compensates the base weight, every
    LoRA adapter's `A` and therefore `W + s·B·A` exactly (the map is linear in
    the weight). `λ = ridge × mean(diag Σ_KK)` is relative, so `M` does not
    depend on how many tokens were seen, and large `ridge` shrinks the update
    towards plain removal.

mean (FLAP's baseline bias)
    Replace the removed features by their mean: the output bias gains
    `W_R μ_R` (`mean_shift`, `add_output_bias_`).

What is here: the statistics (`InputGram`, and `GramHooks` that collect them
during ordinary forward passes), the math on one layer (`least_squares_map`,
`mean_shift`) and its application to the modules the forward uses
(`compensate_columns_` for nn.Linear, bitsandbytes Linear8bitLt / Linear4bit and peft
LoRA around any; `add_output_bias_`). Which groups to remove, when, and what the
export must record are the engine's business.

The Gram matrix is of the *unmasked* input: `GramHooks` runs before hfprune's
mask hooks, so removed features keep their real values (what `W_R x_R` was).
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .importance.activation import CONSUMERS, TOKEN_BLOCK
from .importance.base import ROW_BLOCK
from .importance.weights import effective_weight
from .structure import LayerStructure, base_layer, is_lora_wrapped, unwrap_model
from . import bnb4bit
from .surgery import is_int8_linear

# The projections whose input columns carry a removable group: o_proj (heads), down_proj (channels).
ROLES: tuple[str, ...] = tuple(role for role, _ in CONSUMERS)

# ridge × mean(diag Σ_KK). benchmarks/compensation_probe.py (SmolLM2, one shot, 20% of the MLP channels of
# layers 3..28, held-out wiki perplexity vs no compensation): with 64 x 256 calibration tokens ridge 0 / 0.01 /
# 0.1 / 1 / 3 / 10 gave -1.0 / -1.5 / -2.3 / -2.7 / -2.2 / -1.4%; with 10 x 64 tokens (fewer than the 1229 kept
# features) +1.3e8 / +15.5 / +6.3 / -0.4 / -1.4 / -1.4% (ridge 5: -1.5%). 1.0 is best with enough tokens and
# never worse than no compensation in either setting; few tokens want a larger ridge.
DEFAULT_RIDGE = 1.0

Indices = Union[torch.Tensor, Sequence[int]]


# ---- statistics -------------------------------------------------------------------------------------------


class InputGram:
    """Σ_t x_t x_tᵀ, Σ_t x_t and the token count of one projection's input features.

    `add(x)` takes any `[..., features]` tensor. The update is computed where `x`
    lives, in float32, and added to the stored Gram on `device` (default: where
    the first `x` lives) in `dtype` (float32 by default; float64 if many
    thousands of calls must be summed). Feature sums are float64.

    `token_mask` (`x.shape[:-1]`, true = counted) excludes tokens such as
    padding. `max_tokens` caps the tokens taken from one call: an evenly
    spaced, deterministic subset of the counted tokens.
    """

    def __init__(self, features: int, device=None, dtype: torch.dtype = torch.float32,
                 max_tokens: Optional[int] = None):
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features={features!r}: must be an integer >= 1")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: the Gram is accumulated in torch.float32 or torch.float64")
        _check_max_tokens(max_tokens)
        self.features = features
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.device = None if device is None else torch.device(device)
        self.gram: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None
        self.count = 0
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device) -> None:
        self.device = torch.device(device)
        self.gram = torch.zeros(self.features, self.features, dtype=self.dtype, device=self.device)
        self.sums = torch.zeros(self.features, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> int:
        """Accumulate the tokens of `x`; returns how many were counted."""
        if x.shape[-1] != self.features:
            raise ValueError(f"input has {x.shape[-1]} features, this Gram {self.features}")
        rows = x.detach().reshape(-1, self.features)
        if token_mask is not None:
            if tuple(token_mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"token_mask has shape {tuple(token_mask.shape)}: expected the input's token shape "
                    f"{tuple(x.shape[:-1])}"
                )
            rows = rows[token_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        n = rows.shape[0]
        if self.max_tokens is not None and n > self.max_tokens:
            # floor(i * n / m) is strictly increasing for m <= n: evenly spread, no repeats.
            index = torch.arange(self.max_tokens, device=rows.device) * n // self.max_tokens
            rows = rows.index_select(0, index)
        if self.gram is None:
            self._allocate(rows.device)
        in_place = rows.device == self.device and self.dtype == torch.float32
        for start in range(0, rows.shape[0], TOKEN_BLOCK):
            block = rows[start : start + TOKEN_BLOCK].float()
            if in_place:
                self.gram.addmm_(block.T, block)
            else:
                self.gram += (block.T @ block).to(device=self.device, dtype=self.dtype)
            self.sums += block.sum(dim=0, dtype=torch.float64).to(self.device)
        self.count += rows.shape[0]
        return rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """Per-feature mean over the counted tokens (float64)."""
        if not self.count:
            raise ValueError("InputGram has seen no tokens yet")
        return self.sums / self.count


def layer_gram_bytes(query_width: int, intermediate: int) -> int:
    """Bytes of one layer's statistics (`GramHooks` keeps an `InputGram` per role: a float32 Gram and float64
    feature sums) for o_proj's input (query heads x head_dim) and down_proj's (the MLP channels)."""
    return sum(4 * width * width + 8 * width for width in (query_width, intermediate))


def _check_max_tokens(max_tokens) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: must be None (every token) or an integer >= 1")


def _inside_backward() -> bool:
    """True while autograd's engine runs a backward pass.

    Gradient checkpointing re-runs layer forwards there (reentrant: inside the
    checkpoint function's backward; non-reentrant: in the saved-tensor unpack
    hook, possibly stopping early), so a forward seen here is a recompute of
    one already counted. torch exposes no public flag for this; the engine's
    graph-task id (-1 outside backward) is what torch.utils.checkpoint reads itself.
    """
    return torch._C._current_graph_task_id() != -1


class GramHooks:
    """`InputGram`s of the o_proj and down_proj inputs of some layers, filled by forward pre-hooks.

        hooks = GramHooks(max_tokens=2048, device="cpu")
        hooks.prepare(model, structure.prunable_layers)
        ... forward passes (training steps or calibration) ...
        gram = hooks.gram(layer.index, "down_proj")
        hooks.release()

    Conventions of hfprune's hook-based criteria: `prepare` is idempotent (it
    removes the hooks of an earlier call), `reset()` drops the statistics,
    `release()` removes the hooks for good, `enabled = False` pauses them.

    - The hooks are *prepended*, so they run before hfprune's mask hooks (also
      forward pre-hooks on these modules) whatever the order of installation:
      they see the unmasked input.
    - With `exclude_padding` (default), the 2-D `attention_mask` passed to the
      decoder stack excludes padded tokens; a mask of another shape is refused
      with an error (pass `exclude_padding=False` to count every token).
    - Forwards run by autograd during a backward pass (gradient checkpointing's
      recompute) are not counted: every token is counted once. Forwards with or
      without gradients both count.
    - A layer whose width changed (sliced by surgery) starts a new Gram.
    """

    def __init__(self, max_tokens: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32,
                 exclude_padding: bool = True):
        _check_max_tokens(max_tokens)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: the Gram is accumulated in torch.float32 or torch.float64")
        self.max_tokens = max_tokens
        self.device = device
        self.dtype = dtype
        self.exclude_padding = exclude_padding
        self.enabled = True
        self.grams: dict[tuple[int, str], InputGram] = {}
        self._handles: list = []
        self._token_mask: Optional[torch.Tensor] = None

    def prepare(self, model: nn.Module, layers: Iterable[LayerStructure]) -> None:
        self.release()
        layers = list(layers)
        for layer in layers:
            for role in ROLES:
                module = layer.projection(role)
                self._handles.append(module.register_forward_pre_hook(self._hook((layer.index, role)), prepend=True))
        if self.exclude_padding and layers:
            self._watch_attention_mask(_decoder_stack(model, layers[0]))

    def _watch_attention_mask(self, stack: nn.Module) -> None:
        signature = inspect.signature(stack.forward)

        def capture(module, args, kwargs):
            try:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = kwargs.get("attention_mask")
            self._token_mask = mask if torch.is_tensor(mask) else None

        def clear(module, args, kwargs, output):
            self._token_mask = None

        self._handles.append(stack.register_forward_pre_hook(capture, with_kwargs=True))
        self._handles.append(stack.register_forward_hook(clear, with_kwargs=True, always_call=True))

    def _tokens_of(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._token_mask
        if mask is None:
            return None
        if mask.dim() != 2 or x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            raise ValueError(
                f"GramHooks(exclude_padding=True) reads a 2-D attention_mask [batch, seq]; got shape "
                f"{tuple(mask.shape)} for an input of shape {tuple(x.shape)}. Pass exclude_padding=False to count "
                "every token"
            )
        return mask[:, -x.shape[1]:] != 0  # with a cache the mask also covers the earlier tokens

    def _hook(self, key: tuple[int, str]):
        def hook(module, args):
            if not self.enabled or _inside_backward():
                return None
            x = args[0]
            gram = self.grams.get(key)
            if gram is None or gram.features != x.shape[-1]:  # first use, or the layer was sliced
                gram = self.grams[key] = InputGram(x.shape[-1], self.device, self.dtype, self.max_tokens)
            gram.add(x, self._tokens_of(x))
            return None

        return hook

    def gram(self, layer_index: int, role: str) -> Optional[InputGram]:
        """The statistics of layer `layer_index`'s `role` ("o_proj" or "down_proj") input, or None if unseen."""
        if role not in ROLES:
            raise ValueError(f"role={role!r}: must be one of {', '.join(ROLES)}")
        return self.grams.get((layer_index, role))

    def reset(self) -> None:
        self.grams.clear()

    def release(self) -> None:
        """Remove every hook and drop the statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.grams.clear()
        self._token_mask = None


def _decoder_stack(model: nn.Module, layer: LayerStructure) -> nn.Module:
    """The module that holds the decoder layers (LlamaModel): it is called with the batch's attention_mask."""
    path = layer.spec.layers.split(".")[:-1]
    module = unwrap_model(model)
    for part in path:
        module = getattr(module, part)
    return module


# ---- the map ----------------------------------------------------------------------------------------------


def _index(name: str, value: Indices, width: int) -> torch.Tensor:
    """A 1-D int64 index of distinct features in [0, width), from indices or a bool mask of length `width`."""
    index = value if torch.is_tensor(value) else torch.as_tensor(list(value), dtype=torch.long)
    if index.dim() != 1:
        raise ValueError(f"{name} has shape {tuple(index.shape)}: expected a 1-D index (or bool mask) of features")
    if index.dtype == torch.bool:
        if index.numel() != width:
            raise ValueError(f"{name} is a bool mask of {index.numel()} features: expected {width}")
        return index.nonzero().squeeze(1).cpu()
    if index.is_floating_point() or index.is_complex():
        raise ValueError(f"{name} has dtype {index.dtype}: expected integer indices or a bool mask")
    index = index.long().cpu()
    outside = index[(index < 0) | (index >= width)]
    if outside.numel():
        raise ValueError(f"{name} holds features {outside[:8].tolist()} outside [0, {width})")
    if torch.unique(index).numel() != index.numel():
        values, counts = torch.unique(index, return_counts=True)
        raise ValueError(f"{name} repeats features {values[counts > 1][:8].tolist()}")
    return index


def _disjoint(width: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
    """Check the index sets are pairwise disjoint; returns how many sets hold each feature."""
    owners = torch.zeros(width, dtype=torch.long)
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = named[a][torch.isin(named[a], named[b])]
            if both.numel():
                raise ValueError(
                    f"{a} and {b} share features {both[:8].tolist()}: a feature is either kept or removed"
                )
        owners[named[a]] += 1
    return owners


def _check_ridge(ridge) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(
            f"ridge={ridge!r}: must be a finite number >= 0 (a multiple of the mean diagonal of the kept Gram block)"
        )
    return float(ridge)


def least_squares_map(
    gram: Union[InputGram, torch.Tensor],
    keep: Indices,
    remove: Indices,
    ridge: float = DEFAULT_RIDGE,
    excluded: Optional[Indices] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`M = Σ_RK (Σ_KK + λI)⁻¹`, shape `[len(remove), len(keep)]`: the kept columns become `W_K + W_R @ M`.

    `gram`: an `InputGram` or its `[features, features]` Σ x xᵀ. `keep`, `remove`:
    feature indices (or bool masks); with `excluded` (features removed and
    compensated earlier, still masked: they take part in neither side) the
    three must cover every feature exactly once. `λ = ridge × mean(diag Σ_KK)`.
    Solved in float64 with a Cholesky factorisation; a singular `Σ_KK + λI`
    (ridge 0 on rank-deficient data) falls back to the minimum-norm solution
    (pseudo-inverse). Returned in `dtype` on the Gram's device.
    """
    ridge = _check_ridge(ridge)
    sigma = gram.gram if isinstance(gram, InputGram) else gram
    if sigma is None:
        raise ValueError("the InputGram has seen no tokens yet")
    if not torch.is_tensor(sigma) or sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        shape = tuple(sigma.shape) if torch.is_tensor(sigma) else type(sigma).__name__
        raise ValueError(f"gram has shape {shape}: expected a square [features, features] matrix")
    width = sigma.shape[0]
    keep, remove = _index("keep", keep, width), _index("remove", remove, width)
    named = {"keep": keep, "remove": remove}
    if excluded is not None:
        named["excluded"] = _index("excluded", excluded, width)
    missing = (_disjoint(width, named) == 0).nonzero().squeeze(1)
    if missing.numel():
        raise ValueError(
            f"features {missing[:8].tolist()} (of {width}) are in neither {' nor '.join(named)}: every input "
            "feature must be kept, removed or excluded"
        )
    if keep.numel() == 0:
        raise ValueError("keep is empty: nothing can absorb the removed features")
    device = sigma.device
    keep_d, remove_d = keep.to(device), remove.to(device)
    s_kk = sigma.index_select(0, keep_d).index_select(1, keep_d).double()
    s_kr = sigma.index_select(0, keep_d).index_select(1, remove_d).double()
    if not (torch.isfinite(s_kk).all() and torch.isfinite(s_kr).all()):
        raise ValueError("the Gram matrix holds inf or nan: its inputs overflowed; accumulate in float32 or float64")
    if remove.numel() == 0:
        return torch.zeros(0, keep.numel(), dtype=dtype, device=device)
    s_kk = (s_kk + s_kk.T) / 2  # summation order leaves it symmetric only up to rounding
    lam = ridge * float(s_kk.diagonal().mean())
    s_kk.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(s_kk)
    if int(info) == 0:
        solution = torch.cholesky_solve(s_kr, factor)  # (Σ_KK + λI) Mᵀ = Σ_KR
    else:
        solution = torch.linalg.pinv(s_kk, hermitian=True) @ s_kr
    return solution.T.contiguous().to(dtype)


def mean_shift(means: Union[InputGram, torch.Tensor], remove: Indices,
               weight: Union[nn.Module, torch.Tensor]) -> torch.Tensor:
    """`W_R @ μ_R` (float32, `[out_features]`): the output bias that stands in for the removed features' mean.

    `weight`: a `[out, in]` tensor or the projection module (then its effective
    weight, de-quantised int8 plus the active LoRA update, read in row blocks).
    """
    mu = means.mean if isinstance(means, InputGram) else means
    if not torch.is_tensor(mu) or mu.dim() != 1:
        raise ValueError(f"means must be a 1-D tensor of per-feature means, got {getattr(mu, 'shape', type(mu))}")
    width = mu.shape[0]
    remove = _index("remove", remove, width)
    mu_r = mu[remove.to(mu.device)].double()
    if isinstance(weight, nn.Module):
        inner = base_layer(weight)
        if inner.in_features != width:
            raise ValueError(f"means cover {width} features, the module has in_features={inner.in_features}")
        blocks = []
        for start in range(0, inner.out_features, ROW_BLOCK):
            rows = effective_weight(weight, slice(start, min(start + ROW_BLOCK, inner.out_features)))
            blocks.append(rows.index_select(1, remove.to(rows.device)).double() @ mu_r.to(rows.device))
        return torch.cat(blocks).float()
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != width:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"weight has shape {shape}: expected [out_features, {width}]")
    w_r = weight.index_select(1, remove.to(weight.device)).double()
    return (w_r @ mu_r.to(weight.device)).float()


# ---- applying it to a module ------------------------------------------------------------------------------


def _update_columns_(data: torch.Tensor, keep: torch.Tensor, remove: torch.Tensor, M: torch.Tensor) -> None:
    """data[:, keep] += data[:, remove] @ M for a floating-point [out, in] tensor, in float32 row blocks."""
    for start in range(0, data.shape[0], ROW_BLOCK):
        rows = data[start : start + ROW_BLOCK]  # a view: writes land in `data`
        update = rows.index_select(1, remove).float() @ M
        rows[:, keep] = (rows.index_select(1, keep).float() + update).to(data.dtype)


def _requantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8() row-wise format: SCB = max_j |W_ij|, CB = round(W · 127 / SCB) in int8."""
    scales = weight.abs().amax(dim=1)
    factor = torch.where(scales > 0, 127.0 / scales, torch.zeros_like(scales))
    return torch.round(weight * factor.unsqueeze(1)).clamp_(-127, 127).to(torch.int8), scales


def _compensate_int8_(module: nn.Module, keep: torch.Tensor, remove: torch.Tensor, M: torch.Tensor) -> None:
    """De-quantise row blocks, update the kept columns, re-quantise each row with its new absmax scale.

    The int8 values and the scales are overwritten in place (the tensors
    `weight.data`, `weight.CB` / `state.CB` and the SCB share), so every holder
    of them sees the new weight; transposed / outlier caches are dropped, as surgery does.
    """
    weight, state = module.weight, module.state
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
    if weight.dtype != torch.int8 or scales is None:
        raise TypeError(
            f"Linear8bitLt with weight dtype {weight.dtype} is not quantized yet; move it to its device "
            "(or run one forward) before compensation"
        )
    data = weight.data
    for start in range(0, data.shape[0], ROW_BLOCK):
        stop = min(start + ROW_BLOCK, data.shape[0])
        dense = data[start:stop].float() * (scales[start:stop].float().unsqueeze(1) / 127.0)
        dense[:, keep] += dense.index_select(1, remove) @ M
        quantized, row_scales = _requantize_rows(dense)
        data[start:stop] = quantized
        scales[start:stop] = row_scales.to(scales.dtype)
    for holder in (weight, state):  # a CB that is not weight.data's storage (never seen) is re-pointed to it
        cb = getattr(holder, "CB", None)
        if cb is not None and cb.data_ptr() != data.data_ptr():
            holder.CB = data
    for cached in ("SB", "CBt", "SBt", "subB", "idx"):
        if cached in vars(state):
            setattr(state, cached, None)


def _compensate_4bit_(module: nn.Module, keep: torch.Tensor, remove: torch.Tensor, M: torch.Tensor) -> None:
    """De-quantise the whole matrix (bitsandbytes' `dequantize_4bit`), update the kept columns, re-quantise
    with the layer's quant type, block size and double quantisation (`hfprune.bnb4bit.quantize_like`).

    Blocks run over the flat matrix, so no row-block shortcut as for int8: the float32 matrix is alive
    while it is updated. The `Params4bit` object stays (optimizer and hook references remain valid); its
    packed codes and quant state are new."""
    bnb4bit.check_4bit_linear(module, "compensated layer")
    dense = bnb4bit.dequantize_rows(module.weight)
    _update_columns_(dense, keep, remove, M)
    new = bnb4bit.quantize_like(module, dense)
    bnb4bit.set_4bit_weight(module, new.data, new.quant_state, module.out_features, module.in_features)


def _reject_dora(module: nn.Module) -> None:
    if any(len(getattr(module, name, {})) for name in ("lora_magnitude_vector", "lora_embedding_A")):
        raise TypeError(f"{type(module).__name__}: DoRA / embedding LoRA layers cannot be compensated; use plain LoRA")


@torch.no_grad()
def compensate_columns_(module: nn.Module, keep: Indices, remove: Indices, M: torch.Tensor) -> None:
    """`W_K += W_R @ M` in place on the weight the forward uses.

    - `torch.nn.Linear`: the weight, in float32 and cast back to its dtype.
    - bitsandbytes `Linear8bitLt`: de-quantised, updated and re-quantised row by
      row with a new absmax scale (each weight moves by at most half a
      quantisation step, `SCB/254`, from the float result).
    - bitsandbytes `Linear4bit` (NF4 / FP4): de-quantised, updated and re-quantised
      in its own format (each weight lands on the nearest 4-bit code of its new block).
    - a peft LoRA wrapper around either: the base weight as above and every
      adapter's `lora_A` (`A_K += A_R @ M`), so `W + s·B·A` is compensated exactly
      for any adapter (`M` depends on the inputs only). DoRA is refused.

    The removed columns are left in place (surgery slices them later; until
    then the mask hooks must keep zeroing their inputs). Parameter objects and
    their storage stay the same, so optimizer references remain valid; optimizer
    state (e.g. Adam's moments of `lora_A`) and `.grad` are left untouched: they
    refer to the same coordinates, now holding compensated values.
    """
    inner = base_layer(module)
    if not isinstance(inner, nn.Linear):
        raise TypeError(
            f"cannot compensate {type(inner).__name__}: expected nn.Linear, Linear8bitLt, Linear4bit or a LoRA wrapper"
        )
    width = inner.in_features
    keep, remove = _index("keep", keep, width), _index("remove", remove, width)
    _disjoint(width, {"keep": keep, "remove": remove})
    if not torch.is_tensor(M) or tuple(M.shape) != (remove.numel(), keep.numel()):
        shape = tuple(M.shape) if torch.is_tensor(M) else type(M).__name__
        raise ValueError(f"M has shape {shape}: expected [len(remove), len(keep)] = [{remove.numel()}, {keep.numel()}]")
    if not torch.isfinite(M).all():
        raise ValueError("M holds inf or nan")
    if is_lora_wrapped(module):
        _reject_dora(module)
    if remove.numel() == 0:
        return
    device = inner.weight.device
    keep, remove, M = keep.to(device), remove.to(device), M.to(device=device, dtype=torch.float32)
    if is_int8_linear(inner):
        _compensate_int8_(inner, keep, remove, M)
    elif bnb4bit.is_4bit_linear(inner):
        _compensate_4bit_(inner, keep, remove, M)
    else:
        _update_columns_(inner.weight.data, keep, remove, M)
    if is_lora_wrapped(module):
        for adapter in module.lora_A.values():
            a = adapter.weight.data
            _update_columns_(a, keep.to(a.device), remove.to(a.device), M.to(a.device))


@torch.no_grad()
def add_output_bias_(module: nn.Module, bias_delta: torch.Tensor) -> None:
    """Add `bias_delta` (`[out_features]`) to the output bias of the (base) Linear, in place.

    A module without a bias gets a new frozen `bias` Parameter (requires_grad
    False, so no optimizer needs to know it) on the weight's device, in the
    weight's dtype (float32 for an int8 weight; bitsandbytes casts it to the
    input's dtype). That changes the architecture: a Llama-style config has no
    bias on o_proj / down_proj, so an export must record it (a config flag).
    """
    inner = base_layer(module)
    if not isinstance(inner, nn.Linear):
        raise TypeError(
            f"cannot add a bias to {type(inner).__name__}: expected nn.Linear, Linear8bitLt or a LoRA wrapper"
        )
    if not torch.is_tensor(bias_delta) or tuple(bias_delta.shape) != (inner.out_features,):
        shape = tuple(bias_delta.shape) if torch.is_tensor(bias_delta) else type(bias_delta).__name__
        raise ValueError(f"bias_delta has shape {shape}: expected [out_features] = [{inner.out_features}]")
    if not torch.isfinite(bias_delta).all():
        raise ValueError("bias_delta holds inf or nan")
    if inner.bias is None:
        weight = inner.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        inner.bias = nn.Parameter(bias_delta.detach().to(device=weight.device, dtype=dtype).clone(),
                                  requires_grad=False)
    else:
        bias = inner.bias.data
        bias.copy_((bias.float() + bias_delta.to(bias.device).float()).to(bias.dtype))
