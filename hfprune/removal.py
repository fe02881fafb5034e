"""What pruning did to a model, kept on the model itself so that any export finds it.

`prune_model` and `PruningCallback` attach a `RemovalRecord` to the pruned transformers model
when they slice its weights: the removal masks in the original index space and the compensation
record. `save_pruned(model, dir, original_checkpoint=...)` reads it when no masks are passed, so a
one-shot prune of a quantized base (whose full-precision weights only the original checkpoint
holds) exports like a trained one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .compensator import CompensationRecord
from .masking import PruningMasks
from .structure import unwrap_model

ATTRIBUTE = "hfprune_removal"


@dataclass
class RemovalRecord:
    masks: PruningMasks  # what was removed, in the original index space
    compensation: CompensationRecord = field(default_factory=CompensationRecord)
    warnings: list = field(default_factory=list)  # what fell short of what was asked, for the export's report


def attach(model: nn.Module, record: RemovalRecord) -> None:
    # object.__setattr__: a plain attribute, not a registered submodule or buffer
    object.__setattr__(unwrap_model(model), ATTRIBUTE, record)


def attached(model: nn.Module) -> Optional[RemovalRecord]:
    return getattr(unwrap_model(model), ATTRIBUTE, None)


def record_removal(model: nn.Module, masks: PruningMasks, compensation: Optional[CompensationRecord] = None) -> RemovalRecord:
    """Attach what was just removed. A model pruned before keeps one record in its original index space:
    the new masks (over the kept groups) are composed into the earlier ones."""
    compensation = compensation or CompensationRecord()
    earlier = attached(model)
    if earlier is not None:
        if earlier.compensation and compensation:
            raise ValueError(
                "this model was already pruned with compensation in this session; pruning it again with "
                "compensation cannot be recorded for the export: save it (save_pruned) and prune the saved checkpoint"
            )
        masks = earlier.masks.compose(masks)
        compensation = compensation or earlier.compensation
    record = RemovalRecord(masks, compensation, list(earlier.warnings) if earlier is not None else [])
    attach(model, record)
    return record
