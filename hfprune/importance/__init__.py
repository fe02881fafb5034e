"""Importance criteria: one module each, a registry by name, and the EMA accumulator.

    from hfprune.importance import register_importance, ImportanceCriterion

    @register_importance("my_criterion")
    class MyCriterion(ImportanceCriterion):
        def element_importance(self, module, rows):
            ...  # [rows, in] float32 tensor, higher = more important

The built-in criteria are listed by name in `names.py` (torch-free) and registered by their
modules when the registry is first used. Names here are imported on first use, as in
`hfprune/__init__.py`, so `hfprune.importance.names` can be read without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "NEEDS": "base",
    "ROLES": "base",
    "GroupScores": "base",
    "ImportanceCriterion": "base",
    "ModuleScores": "base",
    "Needs": "base",
    "RemovalTarget": "base",
    "available_importances": "base",
    "get_importance": "base",
    "group_scores": "base",
    "normalize_module_scores": "base",
    "register_importance": "base",
    "ScoreAccumulator": "accumulator",
    "check_scores_in_training": "scoring",
    "make_accumulator": "scoring",
    "make_criterion": "scoring",
    "make_training_criterion": "scoring",
    "score_layers": "scoring",
    "score_model": "scoring",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .accumulator import ScoreAccumulator
    from .base import (
        NEEDS, ROLES, GroupScores, ImportanceCriterion, ModuleScores, Needs, RemovalTarget, available_importances,
        get_importance, group_scores, normalize_module_scores, register_importance,
    )
    from .scoring import (
        check_scores_in_training, make_accumulator, make_criterion, make_training_criterion, score_layers, score_model,
    )
