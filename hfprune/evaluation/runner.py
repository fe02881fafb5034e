"""``hfprune eval``: evaluate a checkpoint (and optionally its dense parent) end to end.

Models are loaded and evaluated one at a time, so a dense 7B and its pruned
child never share memory; speed-ups come from the two stored speed results,
measured with identical settings in the same process.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence

import torch

from .flops import decoder_widths, flops_per_token
from .multiple_choice import AVERAGE, ZERO_SHOT_DEV_TASKS, evaluate_zero_shot, load_suites
from .perplexity import perplexity
from .results import EvaluationReport, ModelEvaluation
from .speed import SpeedComparison, SpeedResult, measure_speed
from .zero_shot import ZERO_SHOT_BATCH_SIZE, ZERO_SHOT_TASKS, zero_shot

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("wikitext2", "ptb")


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    name: str = "model",
    sources: Sequence[str] = DEFAULT_SOURCES,
    seq_len: int = 2048,
    tasks: Sequence[str] = (),
    speed: bool | dict = False,
    batch_size: int = 1,
    max_windows: int | None = None,
    tail: str = "drop",
    task_dir: str | os.PathLike | None = None,
    zero_shot_limit: int | float | None = None,
    zero_shot_dev: str | os.PathLike | None = None,
    zero_shot_dev_tasks: Sequence[str] = ZERO_SHOT_DEV_TASKS,
    progress: bool = False,
    zero_shot_batch_size: int | str = ZERO_SHOT_BATCH_SIZE,
) -> ModelEvaluation:
    """Measure one in-memory model. ``speed`` is False, True, or kwargs of ``measure_speed``.

    ``batch_size`` is perplexity windows per forward pass; lm-eval's zero-shot requests, much shorter, go
    ``zero_shot_batch_size`` at a time.

    ``zero_shot_dev`` is a ``zeroshot_dev/`` folder: its suites are scored by hfprune's own
    multiple-choice scorer (``zero_shot_limit`` rows each if given), beside any lm-eval ``tasks``.
    """
    evaluation = ModelEvaluation(name=name, params=sum(p.numel() for p in model.parameters()))
    try:
        widths = decoder_widths(model)
        evaluation.flops_per_token = flops_per_token(widths, seq_len)
        evaluation.layer_widths = [vars(layer).copy() for layer in widths.layers]
    except ValueError as err:  # not a Llama-like decoder: everything else still applies
        logger.warning("FLOPs not counted: %s", err)
    for source in sources:
        result = perplexity(
            model, tokenizer, source, seq_len=seq_len, batch_size=batch_size,
            max_windows=max_windows, tail=tail, progress=progress,
        )
        evaluation.perplexity[str(source)] = result.ppl
        logger.info("%s: perplexity %s = %.3f over %d tokens", name, source, result.ppl, result.n_tokens)
    if tasks:
        evaluation.zero_shot = zero_shot(
            model, tokenizer, tasks=tasks, batch_size=zero_shot_batch_size, task_dir=task_dir, limit=zero_shot_limit
        )
    if zero_shot_dev is not None:
        evaluation.zero_shot_dev = evaluate_zero_shot(
            model, tokenizer, zero_shot_dev, tasks=zero_shot_dev_tasks, limit=zero_shot_limit, progress=progress
        )
        logger.info("%s: zero-shot dev average acc %.4f", name, evaluation.zero_shot_dev[AVERAGE]["acc"])
    if speed:
        evaluation.speed = measure_speed(model, **(speed if isinstance(speed, dict) else {})).to_dict()
    return evaluation


def build_report(pruned: ModelEvaluation, dense: ModelEvaluation | None = None, settings: dict | None = None) -> EvaluationReport:
    """Combine per-model evaluations into a report with speed-ups and the FLOPs limit."""
    report = EvaluationReport(pruned=pruned, dense=dense, settings=dict(settings or {}))
    if dense is None:
        return report
    if dense.speed and pruned.speed:
        comparison = SpeedComparison.from_results(SpeedResult(**dense.speed), SpeedResult(**pruned.speed))
        report.prefill_speedup = comparison.prefill_speedup
        report.decode_speedup = comparison.decode_speedup
    if dense.flops_per_token and pruned.flops_per_token:
        report.flops_speedup_limit = dense.flops_per_token / pruned.flops_per_token
    return report


def load_model(model_path: str | os.PathLike, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a hub id or a local checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def run_eval(
    model_path: str | os.PathLike,
    sources: Sequence[str] = DEFAULT_SOURCES,
    seq_len: int = 2048,
    tasks: Sequence[str] = ZERO_SHOT_TASKS,
    speed: bool | dict = True,
    output: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    tail: str = "drop",
    task_dir: str | os.PathLike | None = None,
    zero_shot_limit: int | float | None = None,
    zero_shot_dev: str | os.PathLike | None = None,
    zero_shot_dev_tasks: Sequence[str] = ZERO_SHOT_DEV_TASKS,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
    zero_shot_batch_size: int | str = ZERO_SHOT_BATCH_SIZE,
) -> EvaluationReport:
    """Evaluate ``model_path`` (and the dense ``baseline`` if given); save to ``output``.

    Defaults follow the pruning papers: WikiText-2 and PTB perplexity at 2048
    tokens and the seven commonsense zero-shot tasks. ``output`` is a JSON
    path; a markdown table is written beside it (same name, ``.md``). ``zero_shot_dev``: see
    :func:`evaluate_model`; its files are checked before any model is loaded.
    """
    if zero_shot_dev is not None:
        load_suites(zero_shot_dev, zero_shot_dev_tasks, zero_shot_limit)
    common = dict(
        sources=sources, seq_len=seq_len, tasks=tasks, speed=speed, batch_size=batch_size,
        max_windows=max_windows, tail=tail, task_dir=task_dir, zero_shot_limit=zero_shot_limit,
        zero_shot_dev=zero_shot_dev, zero_shot_dev_tasks=zero_shot_dev_tasks, progress=progress,
        zero_shot_batch_size=zero_shot_batch_size,
    )
    evaluations = {}
    for role, path in (("dense", baseline), ("pruned", model_path)):
        if path is None:
            continue
        model, tokenizer = load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        evaluations[role] = evaluate_model(model, tokenizer, name=str(path), **common)
        del model, tokenizer
        gc.collect()  # free the first model before the second is loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in common.items() if k != "progress"}
    settings["sources"] = [str(source) for source in sources]
    settings["tasks"] = list(tasks)
    settings["task_dir"] = None if task_dir is None else str(task_dir)
    settings["zero_shot_dev"] = None if zero_shot_dev is None else str(zero_shot_dev)
    settings["zero_shot_dev_tasks"] = list(zero_shot_dev_tasks)
    report = build_report(evaluations["pruned"], evaluations.get("dense"), settings)
    if output is not None:
        report.save(output)
    return report
