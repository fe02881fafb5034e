"""hfprune: LoRA-guided structured pruning for Hugging Face models.

    from hfprune import PruningConfig, PruningTrainer, PruningCallback, prune_model
"""

from .callback import PruningCallback
from .config import PruningConfig
from .importance import ImportanceCriterion, available_importances, get_importance, register_importance
from .masking import LayerMask, MaskHooks, PruningMasks, apply_masks
from .prune import prune_model
from .structure import ArchitectureSpec, discover, register_architecture, supported_model_types
from .surgery import remove_pruned_groups
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "ImportanceCriterion",
    "LayerMask",
    "MaskHooks",
    "PruningCallback",
    "PruningConfig",
    "PruningTrainer",
    "PruningMasks",
    "apply_masks",
    "available_importances",
    "discover",
    "get_importance",
    "prune_model",
    "register_architecture",
    "register_importance",
    "remove_pruned_groups",
    "supported_model_types",
]
