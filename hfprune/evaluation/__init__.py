"""Evaluation of dense and pruned causal LMs: perplexity, zero-shot accuracy
(lm-eval's, or our own multiple-choice scorer on the local dev slices), speed and
FLOPs, and the report that compares them.

Every function takes any ``transformers`` causal LM and tokenizer; nothing here
depends on how the model was pruned.
"""

from .flops import (
    DecoderWidths,
    LayerWidths,
    decoder_widths,
    flops_breakdown,
    flops_per_token,
    flops_speedup_limit,
)
from .multiple_choice import ZERO_SHOT_DEV_TASKS, Question, evaluate_zero_shot, score_questions
from .perplexity import HUB_SOURCES, PerplexityResult, load_texts, perplexity
from .results import EvaluationReport, ModelEvaluation
from .runner import build_report, evaluate_model, load_model, run_eval
from .speed import SpeedComparison, SpeedResult, compare_speed, measure_speed
from .zero_shot import ZERO_SHOT_TASKS, zero_shot

__all__ = [
    "DecoderWidths",
    "EvaluationReport",
    "HUB_SOURCES",
    "LayerWidths",
    "ModelEvaluation",
    "PerplexityResult",
    "Question",
    "SpeedComparison",
    "SpeedResult",
    "ZERO_SHOT_DEV_TASKS",
    "ZERO_SHOT_TASKS",
    "build_report",
    "compare_speed",
    "decoder_widths",
    "evaluate_model",
    "evaluate_zero_shot",
    "flops_breakdown",
    "flops_per_token",
    "flops_speedup_limit",
    "load_model",
    "load_texts",
    "measure_speed",
    "perplexity",
    "run_eval",
    "score_questions",
    "zero_shot",
]
