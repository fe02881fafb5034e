"""The pruning report: the machine-readable record of what a pruning run did, beside every checkpoint.

    report = PruningReport.from_dir("out/pruned")
    report.reached["sparsity"], report.parameters["after"], report.evaluation

One dataclass, filled by the parts of a run that know each fact, and written by one
function (`PruningReport.save`, atomically):

    what was exported        hfprune.export.save_pruned      base model, widths, kept indices, parameters, files
    how it was pruned        PruningCallback.training_report criterion, config, schedule, reached sparsity, steps
    what it was trained on   PruningTrainer / the recipe      datasets, recipe          (`report_metadata`)
    what it measured         record_evaluation                perplexity, zero-shot, speed-ups

A field that no part of the run knew is null: the report never claims more than happened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from .atomic import write_text_atomic

#: Written by `hfprune.export.save_pruned` into every exported checkpoint.
REPORT_FILE = "pruning_report.json"

PathLike = Union[str, os.PathLike]

@dataclass
class PruningReport:
    """`pruning_report.json`. None (null in the file) means "not known to the run that wrote it".

    Attributes:
        base_model: hub id of the unpruned model (a local path when it has none); base_model_revision its commit.
        criterion, target_sparsity: what was asked. reached: `SparsityReport.as_dict()` of what was removed.
        parameters: {"before", "after", "removed", "removed_fraction"} of the exported checkpoint.
        model_type, format ("uniform" | "heterogeneous"), format_reason, loading, dtype: the checkpoint.
        pruning_config: `PruningConfig.to_dict()`; pruning_steps, optimizer_steps, train_examples: the run.
        datasets: the training data as given ([{"path", "name", "split", "weight"}] from a recipe).
        history: the pruning events of the run (mask updates, physical removal) with their sparsity.
        layers: per decoder layer its kept widths, `original` widths and the kept original indices.
        export: how the checkpoint was written (hfprune version, tensors streamed / from memory, files).
        recipe: the recipe that ran (`hfprune prune`). evaluation: `EvaluationReport.to_dict()`.
        warnings: what fell short of what was asked (a reached sparsity clearly below the target, weights
            with NaN / Inf exported on request), each a sentence; the model card shows them.
        extra: keys written by someone else (`save_pruned(report={...})`), kept as they are.
    """

    base_model: Optional[str] = None
    base_model_revision: Optional[str] = None
    criterion: Optional[str] = None
    target_sparsity: Optional[float] = None
    reached: Optional[dict] = None
    parameters: Optional[dict] = None
    model_type: Optional[str] = None
    format: Optional[str] = None
    format_reason: Optional[str] = None
    loading: Optional[str] = None
    dtype: Optional[str] = None
    pruning_config: Optional[dict] = None
    pruning_steps: Optional[int] = None
    optimizer_steps: Optional[int] = None
    train_examples: Optional[int] = None
    datasets: Optional[list] = None
    history: Optional[list] = None
    layers: Optional[list] = None
    export: Optional[dict] = None
    recipe: Optional[dict] = None
    evaluation: Optional[dict] = None
    warnings: Optional[list] = None
    extra: dict = field(default_factory=dict)

    # ---- conversions ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PruningReport:
        if not isinstance(data, dict):
            raise TypeError(f"a pruning report is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> str:
        return compact_json(self.to_dict()) + "\n"

    # ---- files ----------------------------------------------------------------------------------------------

    def save(self, directory: PathLike) -> Path:
        """Write `<directory>/pruning_report.json` (through a temporary file and a rename)."""
        return write_text_atomic(Path(directory) / REPORT_FILE, self.to_json())

    @classmethod
    def from_dir(cls, directory: PathLike) -> PruningReport:
        """The report of a checkpoint directory; FileNotFoundError when it has none."""
        path = Path(directory) / REPORT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{Path(directory)} has no {REPORT_FILE}: it was not written by hfprune")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None

    # ---- combining ------------------------------------------------------------------------------------------

    def update(self, other: Union[PruningReport, dict, None]) -> PruningReport:
        """Take `other`'s known values (it wins; mappings are merged key by key, None never overwrites)."""
        if other is None:
            return self
        given = other.to_dict() if isinstance(other, PruningReport) else dict(other)
        merged = _merge(self.to_dict(), given)
        updated = PruningReport.from_dict(merged)
        for f in fields(self):
            setattr(self, f.name, getattr(updated, f.name))
        return self


def _merge(base: dict, given: dict) -> dict:
    merged = dict(base)
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def compact_json(value: Any, indent: int = 0) -> str:
    """JSON with mappings indented and lists of plain values on one line (kept-index lists stay readable)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}  {json.dumps(str(k))}: {compact_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return json.dumps(list(value), default=str)
        items = [f"{pad}  {compact_json(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, default=str)
