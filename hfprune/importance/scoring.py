"""One way to score a model: the criterion a config names, its accumulator, and one scoring pass.

The training callback (every optimizer step) and `prune_model` (one shot) both call `score_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..structure import ModelStructure
from .accumulator import ScoreAccumulator
from .base import ImportanceCriterion, ModuleScores, get_importance

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig


def make_criterion(config: "PruningConfig") -> ImportanceCriterion:
    """The registered criterion `config.importance`, seeded with `config.seed`; unknown names raise here."""
    criterion = get_importance(config.importance)
    criterion.seed = config.seed
    return criterion


def make_training_criterion(config: "PruningConfig") -> ImportanceCriterion:
    """`make_criterion` for a training run (PruningCallback, PruningTrainer, recipes): refuses a criterion a
    training step cannot feed, before any model is loaded."""
    criterion = make_criterion(config)
    check_scores_in_training(config.importance, criterion)
    return criterion


def check_scores_in_training(name: str, criterion: ImportanceCriterion) -> None:
    if not criterion.scores_training_steps:
        raise ValueError(
            f"importance={name!r} scores with forward passes of its own (needs={criterion.needs!r}: it samples "
            "sub-models and measures their loss), which a training step does not run, so PruningTrainer, "
            "PruningCallback and recipes cannot use it: prune in one shot with hfprune.prune_model(model, config, "
            "calibration_data), then fine-tune the pruned model to recover; or train with a criterion that scores "
            "from the step itself ('activation', 'flap', 'activation_taylor', 'lora', 'taylor')"
        )


def make_accumulator(config: "PruningConfig", criterion: ImportanceCriterion, *, one_shot: bool = False) -> ScoreAccumulator:
    """The EMA the config asks for (`one_shot`: no history, the last scoring is the score)."""
    return ScoreAccumulator(
        decay=0.0 if one_shot else config.ema_decay,
        normalize=config.score_normalization,
        signed=criterion.signed,
    )


def score_layers(structure: ModelStructure, criterion: ImportanceCriterion) -> dict[int, ModuleScores]:
    """Every prunable layer's module scores, or {} when the criterion has nothing to score yet."""
    step_scores = {}
    for layer in structure.prunable_layers:
        scores = criterion.score_layer(layer)
        if scores is None:
            return {}
        step_scores[layer.index] = scores
    return step_scores


def score_model(structure: ModelStructure, criterion: ImportanceCriterion, accumulator: ScoreAccumulator,
                reduce: Optional[Callable[[dict, ModelStructure], dict]] = None) -> bool:
    """Score every prunable layer once and fold the result into `accumulator`.

    `reduce(step_scores, structure)` combines the step's scores before they are folded in (the
    callback averages hook criteria's scores over the ranks: `hfprune.distributed.average_scores`).
    False when nothing was folded in: the criterion had nothing to score (no gradient this step) or
    the scores were not finite (the accumulator counts those in `num_skipped`).
    """
    step_scores = score_layers(structure, criterion)
    if reduce is not None:
        step_scores = reduce(step_scores, structure)
    return accumulator.update(step_scores)
