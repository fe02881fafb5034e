"""Read the original checkpoint tensor by tensor and slice it to the pruned shapes.

A 65B model pruned on an 8-bit base never exists in full precision in memory: the export
opens the original safetensors shards one after the other (`safe_open`, one tensor at a
time), keeps the rows/columns the masks keep, adds the LoRA delta and hands the result to
the shard writer. Peak memory is about one output shard plus one tensor plus the LoRA
weights.

Masks are in the original index space: query head `h` is rows `[h*head_dim, (h+1)*head_dim)`
of q_proj (and the same o_proj columns); KV group `g` is kept while any of its query heads
is; MLP channel `c` is row `c` of gate/up and column `c` of down.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open

from ..masking import PruningMasks
from ..structure import ModelStructure
from .safety import check_no_pickles, safetensors_files

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def resolve_checkpoint(name_or_path: Union[str, Path], revision: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """A local checkpoint directory for `name_or_path`, and its commit hash when known.

    A hub id is downloaded with `snapshot_download`, safetensors and JSON files only, so a
    pickle is never even fetched.
    """
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"original_checkpoint={str(name_or_path)!r}: expected a checkpoint directory")
        return path, commit_from_cache_path(path)
    from huggingface_hub import snapshot_download

    snapshot = Path(
        snapshot_download(str(name_or_path), revision=revision, allow_patterns=["*.safetensors", "*.json"])
    )
    return snapshot, commit_from_cache_path(snapshot)


def commit_from_cache_path(path: Path) -> Optional[str]:
    """`.../snapshots/<commit>` in the Hugging Face cache names its commit."""
    path = Path(path)
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def repo_id_from_cache_path(path: Path) -> Optional[str]:
    """`.../models--org--name/snapshots/<commit>` in the Hugging Face cache is `org/name`."""
    path = Path(path)
    if commit_from_cache_path(path) and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return None


class OriginalCheckpoint:
    """The unpruned safetensors checkpoint, read one tensor at a time."""

    def __init__(self, name_or_path: Union[str, Path], revision: Optional[str] = None):
        self.name = str(name_or_path)
        self.path, self.commit = resolve_checkpoint(name_or_path, revision)
        check_no_pickles(self.path)
        self.files = safetensors_files(self.path)
        self._headers = None

    def headers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype), from the safetensors headers only."""
        if self._headers is None:
            headers = {}
            for file in self.files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        headers[name] = (tuple(view.get_shape()), _DTYPES.get(view.get_dtype(), None))
            self._headers = headers
        return self._headers

    def config(self) -> dict:
        file = self.path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The checkpoint's weight dtype: config.json's `dtype`, else the most common floating dtype."""
        config = self.config()
        named = config.get("dtype") or config.get("torch_dtype")
        if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
            return getattr(torch, named)
        counts: dict[torch.dtype, int] = {}
        for shape, dtype in self.headers().values():
            if dtype is not None and dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None

    def tensors(self) -> Iterator[tuple[str, "_LazyTensor"]]:
        """(name, lazy tensor) for every tensor, shard after shard; each is read only when asked for."""
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, _LazyTensor(handle, name)


@dataclass
class _LazyTensor:
    handle: object
    name: str

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name)


@dataclass(frozen=True)
class SliceRule:
    """Which unit a tensor's `dim` is laid out by: query heads, KV heads or MLP channels."""

    layer: int
    dim: int
    unit: str  # "query_heads" | "kv_heads" | "channels"


def slice_rules(structure: ModelStructure) -> dict[str, SliceRule]:
    """Tensor name -> how pruning slices it, for every prunable tensor of every decoder layer."""
    spec = structure.spec
    rules: dict[str, SliceRule] = {}
    for layer in structure:
        i = layer.index
        attention = f"{spec.layers}.{i}.{spec.attention}"
        mlp = f"{spec.layers}.{i}.{spec.mlp}"
        for suffix in ("weight", "bias"):
            rules[f"{attention}.{spec.q_proj}.{suffix}"] = SliceRule(i, 0, "query_heads")
            rules[f"{attention}.{spec.k_proj}.{suffix}"] = SliceRule(i, 0, "kv_heads")
            rules[f"{attention}.{spec.v_proj}.{suffix}"] = SliceRule(i, 0, "kv_heads")
            rules[f"{mlp}.{spec.gate_proj}.{suffix}"] = SliceRule(i, 0, "channels")
            rules[f"{mlp}.{spec.up_proj}.{suffix}"] = SliceRule(i, 0, "channels")
        rules[f"{attention}.{spec.o_proj}.weight"] = SliceRule(i, 1, "query_heads")
        rules[f"{mlp}.{spec.down_proj}.weight"] = SliceRule(i, 1, "channels")
        for norm in spec.per_head_q_norms:
            rules[f"{attention}.{norm}.weight"] = SliceRule(i, 0, "query_heads")
        for norm in spec.per_head_kv_norms:
            rules[f"{attention}.{norm}.weight"] = SliceRule(i, 0, "kv_heads")
    return rules


def keep_index(rule: SliceRule, masks: PruningMasks, head_dim: int, size: int, name: str) -> Optional[torch.Tensor]:
    """Indices along `rule.dim` that the masks keep (None: keep everything)."""
    if rule.layer not in masks.layers:
        return None
    mask = masks[rule.layer]
    if rule.unit == "channels":
        keep = mask.channels
        described = f"{mask.channels.numel()} channels"
    elif rule.unit == "query_heads":
        keep = mask.heads.repeat_interleave(head_dim)
        described = f"{mask.heads.numel()} query heads x head_dim {head_dim}"
    else:
        num_kv_heads = size // head_dim
        if num_kv_heads < 1 or size % head_dim or mask.heads.numel() % num_kv_heads:
            keep = None
        else:
            keep = mask.kv_groups(num_kv_heads).repeat_interleave(head_dim)
        described = f"{mask.heads.numel()} query heads (head_dim {head_dim})"
    if keep is None or keep.numel() != size:
        raise ValueError(
            f"{name}: the masks for layer {rule.layer} ({described}) do not fit its size {size} along dim {rule.dim} "
            "in the original checkpoint; masks must be in the original checkpoint's index space"
        )
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def slice_original(
    tensor: torch.Tensor, rule: Optional[SliceRule], masks: Optional[PruningMasks], head_dim: int, name: str
) -> torch.Tensor:
    """The kept part of an original tensor (the tensor itself when nothing of it is pruned)."""
    if rule is None or masks is None:
        return tensor
    index = keep_index(rule, masks, head_dim, tensor.shape[rule.dim], name)
    return tensor if index is None else tensor.index_select(rule.dim, index)
