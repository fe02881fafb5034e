"""What is measured on a model: held-out perplexity, zero-shot accuracy, and both inside the training loop.

Perplexity: windows of `seq_len` tokens, no context carried over (LLM-Pruner's evaluation), the first
`windows` windows of each held-out text. Zero-shot: hfprune's own multiple-choice scorer on the
`zeroshot_dev/` slices (PIQA, ARC-Easy, WinoGrande, HellaSwag), `acc` and `acc_norm`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

import common

ZERO_SHOT_DIR = common.DATA_DIR / "zeroshot_dev"


@dataclass(frozen=True)
class EvalSettings:
    windows: int = 16
    seq_len: int = 128
    batch_size: int = 8
    zero_shot_limit: Optional[int] = None  # rows per task; None: all of them (the honest number)


def perplexities(model, tokenizer, held_out: dict, settings: EvalSettings) -> dict:
    """`{"wiki": ppl, "c4": ppl, "<name>_tokens": n, "seconds": s}` over `held_out` ({name: texts})."""
    from hfprune.evaluation import perplexity

    start = time.perf_counter()
    out = {}
    for name, texts in held_out.items():
        result = perplexity(model, tokenizer, texts, seq_len=settings.seq_len, batch_size=settings.batch_size,
                            max_windows=settings.windows)
        out[name] = result.ppl
        out[f"{name}_tokens"] = result.n_tokens
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- zero-shot


def zero_shot_scorer() -> Optional[Callable]:
    """hfprune's multiple-choice scorer, `evaluate_zero_shot(model, tokenizer, data_dir, tasks=, limit=)`,
    or None where this checkout does not have it yet (it comes from the `zeroshot` branch)."""
    try:
        from hfprune.evaluation.multiple_choice import evaluate_zero_shot
    except ImportError:
        return None
    return evaluate_zero_shot


def check_zero_shot() -> None:
    """Before any run: zero-shot was asked for, so the scorer and the data must be there."""
    if zero_shot_scorer() is None:
        raise SystemExit("zero-shot asked for, but hfprune.evaluation.multiple_choice.evaluate_zero_shot is not in "
                         "this checkout (branch `zeroshot`); merge it, or pass --zero-shot none")
    if not ZERO_SHOT_DIR.is_dir():
        raise SystemExit(f"zero-shot asked for, but {ZERO_SHOT_DIR} is not a directory (HFPRUNE_DATA_DIR?)")


def zero_shot(model, tokenizer, settings: EvalSettings) -> dict:
    """`{task: {"acc", "acc_norm", "n"}, "average": {...}, "seconds": s}` (WinoGrande has no acc_norm)."""
    start = time.perf_counter()
    results = zero_shot_scorer()(model, tokenizer, ZERO_SHOT_DIR, limit=settings.zero_shot_limit)
    return {**results, "limit": settings.zero_shot_limit, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- inside the training loop


class Probe(TrainerCallback):
    """A TrainerCallback that times every optimizer step and measures perplexity in the loop.

    A step's time runs from its start to the next step's start, so the work done at its end by the
    pruning callback (mask updates, compensation, slicing) is counted; in-loop evaluations are not.
    Perplexity is measured (eval mode, no gradient, scoring hooks paused, then back to training):
    once right after the pruning stage (`after_pruning`: weights sliced, or masks final when they are
    kept to the end) and every `every` completed steps (`curve`, with the sparsity reached then).
    """

    def __init__(self, measure: Callable, every: int = 0, pruning_callback=None):
        self.measure = measure  # model -> perplexities dict
        self.every = every
        self.pruning_callback = pruning_callback
        self.step_seconds: list[float] = []
        self.curve: list[dict] = []
        self.after_pruning: dict = {}
        self.eval_seconds = 0.0
        self._step_start = None

    def _sparsity(self) -> Optional[float]:
        callback = self.pruning_callback
        return callback.sparsity().sparsity if callback is not None and callback.structure is not None else None

    def _switches(self) -> list:
        """The pruning callback's recorders (hook-based criteria, the compensator's Gram hooks)."""
        callback = self.pruning_callback
        return [s for s in (getattr(callback, "criterion", None), getattr(callback, "compensator", None))
                if hasattr(s, "enabled")]

    def _evaluate(self, model) -> dict:
        switches = self._switches()
        flags = [s.enabled for s in switches]
        was_training = model.training
        try:
            for switch in switches:  # the evaluation's forward passes must not enter scores or Gram matrices
                switch.enabled = False
            model.eval()
            with torch.no_grad():
                values = self.measure(model)
        finally:
            for switch, flag in zip(switches, flags):
                switch.enabled = flag
            model.train(was_training)
        self.eval_seconds += values["seconds"]
        return values

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
        step, callback = state.global_step, self.pruning_callback
        if callback is not None and not self.after_pruning and step > 0 and (
                callback.physically_pruned or step >= callback.schedule.total_steps):
            self.after_pruning = self._evaluate(model)
            self.curve.append({"step": step, "sparsity": self._sparsity(), **self.after_pruning})
        if self.every and step > 0 and step % self.every == 0 and not any(p["step"] == step for p in self.curve):
            self.curve.append({"step": step, "sparsity": self._sparsity(), **self._evaluate(model)})
        self._step_start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
            self._step_start = None
