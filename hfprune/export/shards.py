"""Write safetensors shards as tensors arrive, so at most one shard is ever held in memory.

Files follow transformers' layout: `model.safetensors` when everything fits in one shard,
else `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Union

import torch

from ..atomic import save_safetensors_atomic
from .safety import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: Union[int, str]) -> int:
    """`5GB` -> 5_000_000_000, `20KiB` -> 20480, like transformers' `max_shard_size`."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size={size}: must be >= 1 byte")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB', '500MB', '20KiB'")
    return max(1, int(float(match.group(1)) * _UNITS[unit]))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Collect tensors into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""

    def __init__(self, directory: Union[str, Path], max_shard_size: Union[int, str] = "5GB"):
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_numel = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._parts):
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().cpu().contiguous()
        size = _nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self.flush()
        if any(t.data_ptr() == tensor.data_ptr() for t in self._pending.values() if t.numel()):
            tensor = tensor.clone()  # safetensors refuses two names on one storage
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size
        self.total_numel += tensor.numel()

    def flush(self) -> None:
        """Write the pending tensors as the next shard and drop them from memory."""
        if not self._pending:
            return
        path = self.directory / f"model-part-{len(self._parts) + 1:05d}.safetensors"
        save_safetensors_atomic(self._pending, path, metadata={"format": "pt"})  # readable (0644) like any checkpoint
        self._parts.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names, write the index; returns the file names."""
        self.flush()
        if not self._parts:
            raise ValueError("no tensors to write")
        if len(self._parts) == 1:
            self._parts[0][0].rename(self.directory / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        count = len(self._parts)
        weight_map: dict[str, str] = {}
        files = []
        for number, (path, names) in enumerate(self._parts, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [SAFETENSORS_INDEX]
