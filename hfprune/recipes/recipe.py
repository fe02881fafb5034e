"""`Recipe`: a validated recipe, one config object per section."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import PruningConfig
from .sections import DataSection, EvalSection, ExportSection, HubSection, ModelSection


@dataclass
class Recipe:
    """A validated recipe. `raw` is the recipe as read (overrides and `${VAR}` applied)."""

    model: ModelSection
    pruning: PruningConfig
    training: Any  # transformers.TrainingArguments
    lora: Any = None  # peft.LoraConfig or None
    distillation: Any = None  # hfprune.distill.DistillationConfig or None
    data: DataSection = field(default_factory=DataSection)
    export: ExportSection = field(default_factory=ExportSection)
    eval: Optional[EvalSection] = None
    hub: Optional[HubSection] = None
    name: str = "recipe"
    description: str = ""
    path: Optional[Path] = None
    raw: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "recipe"

    def to_dict(self) -> dict:
        """The resolved recipe (defaults filled in), JSON-friendly: for reports and logs."""
        training = self.training.to_dict()
        for key in ("hub_token", "push_to_hub_token"):
            training.pop(key, None)

        def section(value):
            return dataclasses.asdict(value) if value is not None else None

        return {
            "name": self.name,
            "model": section(self.model),
            "pruning": self.pruning.to_dict(),
            "lora": _lora_dict(self.lora),
            "distillation": section(self.distillation),
            "training": training,
            "data": section(self.data),
            "export": section(self.export),
            "eval": section(self.eval),
            "hub": section(self.hub),
        }


def _lora_dict(lora) -> Optional[dict]:
    if lora is None:
        return None
    out = {}
    for f in dataclasses.fields(lora):
        value = getattr(lora, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, set):
            value = sorted(value)
        if value is None or isinstance(value, (bool, int, float, str, list, dict)):
            out[f.name] = value
    return out
