"""Evaluation results of a pruned model (and its dense parent): JSON and a markdown table.

Everything is stored as plain numbers and dicts so the JSON file is readable
without this package; ``EvaluationReport.load`` rebuilds the dataclasses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_text_atomic
from .multiple_choice import AVERAGE


@dataclass
class ModelEvaluation:
    """What was measured on one model. Empty fields were not measured."""

    name: str
    params: int
    perplexity: dict[str, float] = field(default_factory=dict)  # source -> ppl
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {acc, acc_norm}
    # task and AVERAGE -> {acc, acc_norm, n}: hfprune's own scorer on the zeroshot_dev/ slices
    zero_shot_dev: dict[str, dict[str, float]] = field(default_factory=dict)
    speed: dict | None = None  # SpeedResult.to_dict()
    flops_per_token: float | None = None
    layer_widths: list[dict] | None = None  # DecoderWidths.layers as dicts

    def mean_accuracy(self) -> float | None:
        """Mean ``acc`` over tasks, the "Average" column of the pruning papers."""
        accs = [metrics["acc"] for metrics in self.zero_shot.values() if "acc" in metrics]
        return sum(accs) / len(accs) if accs else None


@dataclass
class EvaluationReport:
    """A pruned model against its dense parent (``dense`` may be absent).

    Speed-ups are pruned throughput / dense throughput; ``flops_speedup_limit``
    is dense FLOPs / pruned FLOPs at ``settings["seq_len"]``.
    """

    pruned: ModelEvaluation
    dense: ModelEvaluation | None = None
    prefill_speedup: float | None = None
    decode_speedup: float | None = None
    flops_speedup_limit: float | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvaluationReport:
        data = dict(data)
        data["pruned"] = ModelEvaluation(**data["pruned"])
        if data.get("dense") is not None:
            data["dense"] = ModelEvaluation(**data["dense"])
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON; ``.md`` beside it gets :meth:`to_markdown`."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        write_text_atomic(path.with_suffix(".md"), self.to_markdown())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_markdown(self) -> str:
        """A table: one row per metric, dense / pruned / change columns."""
        models = [m for m in (self.dense, self.pruned) if m is not None]
        header = ["metric"] + [m.name for m in models]
        if self.dense is not None:
            header.append("pruned vs dense")
        rows = [_row("parameters", models, lambda m: m.params, _count, _ratio)]
        seq_len = self.settings.get("seq_len")
        if any(m.flops_per_token for m in models):
            label = f"FLOPs / token (L={seq_len})" if seq_len else "FLOPs / token"
            rows.append(_row(label, models, lambda m: m.flops_per_token, _count, _ratio))
        for source in _keys(models, "perplexity"):
            label = f"perplexity {source}" + (f" (seq {seq_len})" if seq_len else "")
            rows.append(_row(label, models, lambda m, s=source: m.perplexity.get(s), _float2, _ratio))
        for task in _keys(models, "zero_shot"):
            for metric in ("acc", "acc_norm"):
                if any(metric in m.zero_shot.get(task, {}) for m in models):
                    rows.append(
                        _row(f"{task} {metric}", models, lambda m, t=task, k=metric: m.zero_shot.get(t, {}).get(k),
                             _percent, _points)
                    )
        if any(m.mean_accuracy() is not None for m in models):
            rows.append(_row("mean acc", models, ModelEvaluation.mean_accuracy, _percent, _points))
        for task in _keys(models, "zero_shot_dev"):
            for metric in ("acc", "acc_norm"):
                if any(metric in m.zero_shot_dev.get(task, {}) for m in models):
                    rows.append(
                        _row(f"{task} {metric} (dev)", models,
                             lambda m, t=task, k=metric: m.zero_shot_dev.get(t, {}).get(k), _percent, _points)
                    )
        if any(m.speed for m in models):
            rows.append(_row("prefill tokens/s", models, lambda m: (m.speed or {}).get("prefill_tokens_per_s"),
                             _float1, _ratio))
            rows.append(_row("decode tokens/s", models, lambda m: (m.speed or {}).get("decode_tokens_per_s"),
                             _float1, _ratio))
        if self.flops_speedup_limit is not None:
            rows.append(["FLOPs speed-up limit"] + [""] * len(models) + [f"{self.flops_speedup_limit:.2f}x"])

        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(row[: len(header)]) + " |")
        notes = _notes(models)
        return "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")


# ---------------------------------------------------------------- table helpers


def _keys(models, attribute: str) -> list[str]:
    keys: list[str] = []
    for model in models:
        keys += [k for k in getattr(model, attribute) if k not in keys]
    return keys


def _row(label, models, get, fmt, change) -> list[str]:
    values = [get(m) for m in models]
    cells = [label] + ["" if v is None else fmt(v) for v in values]
    if len(models) == 2:
        dense, pruned = values
        cells.append("" if dense is None or pruned is None else change(dense, pruned))
    return cells


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:g}"


def _float1(value: float) -> str:
    return f"{value:.1f}"


def _float2(value: float) -> str:
    return f"{value:.2f}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _ratio(dense: float, pruned: float) -> str:
    return f"{pruned / dense:.2f}x" if dense else ""


def _points(dense: float, pruned: float) -> str:
    return f"{100 * (pruned - dense):+.2f}"


def _notes(models) -> str:
    notes = []
    if any(m.zero_shot or m.zero_shot_dev for m in models):
        # The change column exists only beside a dense baseline.
        notes.append("Accuracies in %; their change in percentage points." if len(models) == 2 else "Accuracies in %.")
    dev = next((m.zero_shot_dev for m in models if m.zero_shot_dev), None)
    if dev:
        rows = ", ".join(f"{task} {metrics['n']}" for task, metrics in dev.items() if task != AVERAGE)
        notes.append(
            f"(dev): hfprune's log-likelihood scorer with lm-eval 0.4.13's task definitions on the zeroshot_dev "
            f"slices ({rows} rows); the acc_norm average counts WinoGrande's acc (it has no acc_norm)."
        )
    speed = next((m.speed for m in models if m.speed), None)
    if speed:
        notes.append(
            f"Speed: batch {speed['batch_size']}, prompt {speed['prompt_len']} tokens, "
            f"{speed['new_tokens']} greedy new tokens, median of {speed['repeats']} runs "
            f"on {speed['device']} ({speed['dtype']})."
        )
    return " ".join(notes)
