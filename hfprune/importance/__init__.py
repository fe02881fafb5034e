"""Importance criteria: one module each, a registry by name, and the EMA accumulator.

    from hfprune.importance import register_importance, ImportanceCriterion

    @register_importance("my_criterion")
    class MyCriterion(ImportanceCriterion):
        def element_importance(self, module, rows):
            ...  # [rows, in] float32 tensor, higher = more important
"""

from . import activation, activation_taylor, bonsai, lora, magnitude, random_, taylor  # noqa: F401  (registers the built-in criteria)
from .accumulator import ScoreAccumulator
from .base import (
    NEEDS,
    ROLES,
    GroupScores,
    ImportanceCriterion,
    ModuleScores,
    Needs,
    RemovalTarget,
    available_importances,
    get_importance,
    group_scores,
    normalize_module_scores,
    register_importance,
)
from .scoring import (
    check_scores_in_training, make_accumulator, make_criterion, make_training_criterion, score_layers, score_model,
)

__all__ = [
    "NEEDS",
    "ROLES",
    "GroupScores",
    "ImportanceCriterion",
    "ModuleScores",
    "Needs",
    "RemovalTarget",
    "ScoreAccumulator",
    "available_importances",
    "check_scores_in_training",
    "get_importance",
    "group_scores",
    "make_accumulator",
    "make_criterion",
    "make_training_criterion",
    "normalize_module_scores",
    "register_importance",
    "score_layers",
    "score_model",
]
