"""What can be pruned: per-architecture discovery of KV groups, query heads and MLP channels."""

from .arch import ArchitectureSpec, get_architecture, register_architecture, supported_model_types
from .discovery import (
    LayerStructure,
    ModelStructure,
    base_layer,
    default_protected_layers,
    discover,
    head_rows,
    is_lora_wrapped,
    unwrap_model,
)

__all__ = [
    "ArchitectureSpec",
    "LayerStructure",
    "ModelStructure",
    "base_layer",
    "default_protected_layers",
    "discover",
    "get_architecture",
    "head_rows",
    "is_lora_wrapped",
    "register_architecture",
    "supported_model_types",
    "unwrap_model",
]
