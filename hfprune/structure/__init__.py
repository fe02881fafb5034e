"""What can be pruned: per-architecture discovery of KV groups, query heads and MLP channels."""

from .arch import (
    ATTENTION_ROLES,
    MLP_ROLES,
    PROJECTION_ROLES,
    ArchitectureSpec,
    get_architecture,
    register_architecture,
    supported_model_types,
)
from .discovery import (
    LayerStructure,
    ModelStructure,
    base_layer,
    default_protected_layers,
    discover,
    discover_for_config,
    head_rows,
    is_lora_wrapped,
    unwrap_model,
)

__all__ = [
    "ATTENTION_ROLES",
    "MLP_ROLES",
    "PROJECTION_ROLES",
    "ArchitectureSpec",
    "LayerStructure",
    "ModelStructure",
    "base_layer",
    "default_protected_layers",
    "discover",
    "discover_for_config",
    "get_architecture",
    "head_rows",
    "is_lora_wrapped",
    "register_architecture",
    "supported_model_types",
    "unwrap_model",
]
