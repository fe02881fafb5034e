"""What can be pruned: per-architecture discovery of KV groups, query heads and MLP channels.

    arch        the declarative family descriptions (torch-free: config-only commands read them)
    discovery   the walk of a model into prunable groups (needs torch)

Names are imported on first use, as in `hfprune/__init__.py`, so that importing
`hfprune.structure.arch` (the recipes' schema and `hfprune --help` do) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "ATTENTION_ROLES": "arch",
    "MLP_ROLES": "arch",
    "PROJECTION_ROLES": "arch",
    "ArchitectureSpec": "arch",
    "get_architecture": "arch",
    "register_architecture": "arch",
    "supported_model_types": "arch",
    "LayerStructure": "discovery",
    "ModelStructure": "discovery",
    "base_layer": "discovery",
    "default_protected_layers": "discovery",
    "discover": "discovery",
    "discover_for_config": "discovery",
    "head_rows": "discovery",
    "is_lora_wrapped": "discovery",
    "unwrap_model": "discovery",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .arch import (
        ATTENTION_ROLES, MLP_ROLES, PROJECTION_ROLES, ArchitectureSpec, get_architecture, register_architecture,
        supported_model_types,
    )
    from .discovery import (
        LayerStructure, ModelStructure, base_layer, default_protected_layers, discover, discover_for_config,
        head_rows, is_lora_wrapped, unwrap_model,
    )
