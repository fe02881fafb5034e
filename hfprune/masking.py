"""Soft pruning: masks that zero a group's contribution while the weights stay in place.

A query head contributes to the layer output only through its `head_dim` input
columns of `o_proj`; an MLP channel only through its input column of
`down_proj`. Zeroing those inputs is therefore exactly equivalent to removing
the group (and a KV group is removed when all of its query heads are). The
hooks sit on the *outermost* o_proj / down_proj module, so with a peft LoRA
wrapper the LoRA path sees the masked input too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .structure import LayerStructure, ModelStructure


@dataclass
class LayerMask:
    """Which query heads and MLP channels of one layer are kept."""

    heads: torch.Tensor  # bool [num_heads]
    channels: torch.Tensor  # bool [intermediate_size]

    def kv_groups(self, num_kv_heads: int) -> torch.Tensor:
        """A KV group is kept while at least one of its query heads is."""
        return self.heads.view(num_kv_heads, -1).any(dim=1)

    def clone(self) -> "LayerMask":
        return LayerMask(self.heads.clone(), self.channels.clone())


class PruningMasks:
    """Keep-masks for every layer, indexed by layer index."""

    def __init__(self, layers: dict[int, LayerMask]):
        self.layers = layers

    @classmethod
    def full(cls, structure: ModelStructure) -> "PruningMasks":
        return cls(
            {
                layer.index: LayerMask(
                    torch.ones(layer.num_heads, dtype=torch.bool), torch.ones(layer.intermediate_size, dtype=torch.bool)
                )
                for layer in structure
            }
        )

    def __getitem__(self, index: int) -> LayerMask:
        return self.layers[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruningMasks) or self.layers.keys() != other.layers.keys():
            return False
        return all(
            torch.equal(m.heads, other.layers[i].heads) and torch.equal(m.channels, other.layers[i].channels)
            for i, m in self.layers.items()
        )

    def clone(self) -> "PruningMasks":
        return PruningMasks({i: m.clone() for i, m in self.layers.items()})

    def compose(self, later: "PruningMasks") -> "PruningMasks":
        """These masks followed by `later`, which is over the groups these keep: one mask in this index space."""
        layers = {}
        for index, mask in self.layers.items():
            then = later.layers.get(index)
            if then is None:
                layers[index] = mask.clone()
                continue
            if then.heads.numel() != int(mask.heads.sum()) or then.channels.numel() != int(mask.channels.sum()):
                raise ValueError(
                    f"layer {index}: the later masks cover {then.heads.numel()} heads / {then.channels.numel()} "
                    f"channels, these keep {int(mask.heads.sum())} / {int(mask.channels.sum())}"
                )
            heads, channels = mask.heads.clone(), mask.channels.clone()
            heads[mask.heads] = then.heads
            channels[mask.channels] = then.channels
            layers[index] = LayerMask(heads, channels)
        return PruningMasks(layers)

    def is_full(self) -> bool:
        return all(bool(m.heads.all()) and bool(m.channels.all()) for m in self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, safetensors-friendly (bool stored as uint8)."""
        out = {}
        for i, m in self.layers.items():
            out[f"masks.{i}.heads"] = m.heads.to(torch.uint8)
            out[f"masks.{i}.channels"] = m.channels.to(torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "PruningMasks":
        layers: dict[int, LayerMask] = {}
        for key in state:
            if key.startswith("masks.") and key.endswith(".heads"):
                i = int(key.split(".")[1])
                layers[i] = LayerMask(state[key].bool().cpu(), state[f"masks.{i}.channels"].bool().cpu())
        return cls(layers)


def _mask_input_hook(layer_mask: "_HookMask"):
    def hook(module: nn.Module, args: tuple):
        return (layer_mask.apply(args[0]),) + tuple(args[1:])

    return hook


class _HookMask:
    """A keep-vector expanded to the hooked module's input width, cached per dtype/device; optionally with
    a reconstruction of the removed features from the kept ones (compensation, see `MaskHooks`)."""

    def __init__(self, keep: torch.Tensor, repeat: int):
        self.set(keep, repeat)

    def set(self, keep: torch.Tensor, repeat: int, reconstruction=None) -> None:
        self._float = keep.repeat_interleave(repeat).float()
        self._reconstruction = reconstruction  # (kept, removed, matrix) feature indices and [removed, kept] map
        self._cache: dict[tuple, tuple] = {}

    def _on(self, x: torch.Tensor) -> tuple:
        key = (x.dtype, x.device)
        if key not in self._cache:
            rec = self._reconstruction
            if rec is not None:
                kept, removed, matrix = rec
                rec = (kept.to(x.device), removed.to(x.device), matrix.to(device=x.device, dtype=x.dtype).T)
            self._cache[key] = (self._float.to(device=x.device, dtype=x.dtype), rec)
        return self._cache[key]

    def get(self, x: torch.Tensor) -> torch.Tensor:
        return self._on(x)[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        keep, rec = self._on(x)
        x = x * keep
        if rec is not None:
            kept, removed, matrix_t = rec
            # the removed features, predicted from the kept ones: W x~ = W_K x_K + W_R M x_K
            x = x.index_copy(-1, removed, x.index_select(-1, kept) @ matrix_t)
        return x


class MaskHooks:
    """Forward pre-hooks on o_proj and down_proj applying `masks` to their inputs.

    Masks are read on every forward, so `update(masks)` takes effect at once.
    Call `remove()` before physical removal (the widths change).

    With `reconstructions` (compensation: `{(layer, role): map}` with the map's `kept`, `removed` feature
    indices and `matrix` M, `[removed, kept]`), a removed input feature is not zeroed but replaced by its
    least-squares prediction `M x_K` from the kept ones: exactly what folding `W_K += W_R M` into the weights
    computes (`hfprune.compensator`), while the weights stay untouched, so switching the hooks off gives back
    the dense model (the distillation teacher) and a checkpoint's frozen base needs no replay.
    """

    def __init__(self, structure: ModelStructure, masks: PruningMasks, layers: Optional[Iterable[int]] = None):
        self.structure = structure
        self._handles: list = []
        self._masks: dict[tuple[int, str], _HookMask] = {}
        self.enabled = True
        for layer in structure:
            if layers is not None and layer.index not in layers:
                continue
            self._install(layer, masks[layer.index])

    def _install(self, layer: LayerStructure, mask: LayerMask) -> None:
        for role, keep, repeat in (("o_proj", mask.heads, layer.head_dim), ("down_proj", mask.channels, 1)):
            hook_mask = _HookMask(keep, repeat)
            self._masks[(layer.index, role)] = hook_mask
            module = layer.projection(role)
            self._handles.append(module.register_forward_pre_hook(self._guarded(_mask_input_hook(hook_mask))))

    def _guarded(self, hook):
        def guarded(module, args):
            return hook(module, args) if self.enabled else None

        return guarded

    def update(self, masks: PruningMasks, reconstructions: Optional[dict] = None) -> None:
        for (index, role), hook_mask in self._masks.items():
            layer = self.structure.layers[index]
            found = (reconstructions or {}).get((index, role))
            rec = (found.kept, found.removed, found.matrix) if found is not None and found.removed.numel() else None
            if role == "o_proj":
                hook_mask.set(masks[index].heads, layer.head_dim, rec)
            else:
                hook_mask.set(masks[index].channels, 1, rec)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks.clear()


def apply_masks(structure: ModelStructure, masks: PruningMasks) -> MaskHooks:
    """Soft-prune `structure.model` with `masks`; returns the hooks (call `.remove()` to undo)."""
    validate_masks(structure, masks)
    return MaskHooks(structure, masks)


def validate_masks(structure: ModelStructure, masks: PruningMasks) -> None:
    """Masks must fit the layers and leave a valid model: >= 1 head, >= 1 channel,
    the same number of query heads in every kept KV group."""
    for layer in structure:
        if layer.index not in masks.layers:
            raise ValueError(f"masks have no entry for layer {layer.index}")
        mask = masks[layer.index]
        if mask.heads.numel() != layer.num_heads or mask.channels.numel() != layer.intermediate_size:
            raise ValueError(
                f"layer {layer.index}: mask widths (heads={mask.heads.numel()}, channels={mask.channels.numel()}) "
                f"do not match the layer (heads={layer.num_heads}, channels={layer.intermediate_size})"
            )
        if not mask.heads.any():
            raise ValueError(f"layer {layer.index}: the mask removes every attention head; keep at least one")
        if not mask.channels.any():
            raise ValueError(f"layer {layer.index}: the mask removes every MLP channel; keep at least one")
        per_group = mask.heads.view(layer.num_kv_heads, layer.n_rep).sum(dim=1)
        kept = per_group[per_group > 0]
        if not bool((kept == kept[0]).all()):
            raise ValueError(
                f"layer {layer.index}: kept query heads per KV group are {per_group.tolist()}; every kept KV group "
                "must keep the same number of query heads (transformers' repeat_kv needs it)"
            )
