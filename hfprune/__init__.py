"""hfprune: LoRA-guided structured pruning for Hugging Face models.

    from hfprune import PruningConfig, PruningTrainer, PruningCallback, prune_model

Names are imported on first use, so `import hfprune` stays fast (the trainer
pulls in transformers' Trainer and bitsandbytes only when asked for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

from ._version import __version__  # noqa: E402,F401

_EXPORTS = {
    "PruningConfig": "config",
    "PruningCallback": "callback",
    "PruningTrainer": "trainer",
    "prune_model": "prune",
    "PruningMasks": "masking",
    "LayerMask": "masking",
    "MaskHooks": "masking",
    "apply_masks": "masking",
    "remove_pruned_groups": "surgery",
    "ArchitectureSpec": "structure",
    "discover": "structure",
    "register_architecture": "structure",
    "supported_model_types": "structure",
    "ImportanceCriterion": "importance",
    "available_importances": "importance",
    "get_importance": "importance",
    "register_importance": "importance",
    "save_pruned": "export",
    "export_gguf": "export",
    "DistillationConfig": "distill",
}

__all__ = sorted(_EXPORTS)

# Before any submodule imports transformers' Trainer (and through peft, bitsandbytes).
from .quiet import quiet_bitsandbytes_import as _quiet_bitsandbytes_import  # noqa: E402

_quiet_bitsandbytes_import()

# Plain `from_pretrained(pruned_dir)` works once hfprune is imported: the hfprune_* config and
# model classes register with the Auto classes as soon as transformers' Auto modules load.
from .export.registration import register_auto_classes as _register_auto_classes  # noqa: E402

_register_auto_classes(defer=True)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .callback import PruningCallback
    from .config import PruningConfig
    from .export import export_gguf, save_pruned
    from .importance import ImportanceCriterion, available_importances, get_importance, register_importance
    from .masking import LayerMask, MaskHooks, PruningMasks, apply_masks
    from .prune import prune_model
    from .structure import ArchitectureSpec, discover, register_architecture, supported_model_types
    from .surgery import remove_pruned_groups
    from .trainer import PruningTrainer
