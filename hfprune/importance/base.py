"""The importance-criterion interface, the registry, and the folding of per-module
scores into group scores.

A criterion scores one decoder layer at a time and returns `ModuleScores`: for
each projection, one number per *unit* that the projection contributes to:

    q_proj, o_proj          per query head     [num_heads]
    k_proj, v_proj          per KV head        [num_kv_heads]
    gate_proj, up_proj,
    down_proj               per MLP channel    [intermediate_size]

Most criteria only define `element_importance(weight, grad)`, an element-wise
importance of one weight matrix; the base class reduces it over each unit's
rows (q/k/v/gate/up) or columns (o/down). `group_scores` then sums the modules
into the scores of the removable groups (query head, KV group, MLP channel).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, get_args

import torch
from torch import nn

from ..structure import LayerStructure, base_layer
from .names import BUILTIN_CRITERIA

#: What must exist when a criterion scores, and so what the caller must run before it:
#:   nothing               weights only (magnitude, random)
#:   forward               forward passes, no gradient at all (activation, flap)
#:   activation_gradients  a backward pass reaching the activations; no weight gradient (activation_taylor)
#:   lora_gradients        gradients of the LoRA factors (lora)
#:   weight_gradients      full gradients of the base weights (taylor, taylor2, param_second, vector): no
#:                         quantized base
#:   forward_loss          no-grad forward passes with labels that the criterion runs itself, over sub-models it
#:                         masks (bonsai): `prune_model` only, which calls `sample_submodels`; a training step
#:                         cannot feed it (see `scores_training_steps`)
Needs = Literal["nothing", "forward", "activation_gradients", "lora_gradients", "weight_gradients", "forward_loss"]
NEEDS: tuple[str, ...] = get_args(Needs)

# (role, reduced dimension of the weight, unit) — output rows for the producers,
# input columns for the consumers.
ROLES: tuple[tuple[str, int, str], ...] = (
    ("q_proj", 0, "head"),
    ("k_proj", 0, "kv"),
    ("v_proj", 0, "kv"),
    ("o_proj", 1, "head"),
    ("gate_proj", 0, "channel"),
    ("up_proj", 0, "channel"),
    ("down_proj", 1, "channel"),
)

ModuleScores = dict[str, torch.Tensor]


# Element-wise importance is computed in blocks of this many output rows, so the
# transient memory stays small even for a 65B model's 8192 x 28672 projections.
ROW_BLOCK = 1024


def reduce_to_units(per_index: torch.Tensor, unit: str, layer: LayerStructure) -> torch.Tensor:
    """Sum per-row (or per-column) importance over the rows (columns) of each unit."""
    if unit == "channel":
        return per_index
    return per_index.view(-1, layer.head_dim).sum(dim=1)


@dataclass
class GroupScores:
    """Scores of the removable groups of one layer (higher = more important)."""

    heads: torch.Tensor  # [num_heads]: a query head, q rows + o columns
    kv_groups: torch.Tensor  # [num_kv_heads]: k + v rows and all of the group's query heads
    channels: torch.Tensor  # [intermediate_size]


def normalize_module_scores(scores: ModuleScores) -> ModuleScores:
    """LoRAPrune's per-module L2 normalisation, so no projection dominates by scale."""
    return {role: s / (torch.linalg.vector_norm(s) + 1e-8) for role, s in scores.items()}


def normalize_role_scores(step_scores: dict[int, ModuleScores]) -> dict[int, ModuleScores]:
    """Each projection role L2-normalised once over all layers: roles are balanced as by
    `normalize_module_scores`, but a layer's scores keep their size relative to other layers'."""
    norms: dict[str, float] = {}
    for scores in step_scores.values():
        for role, s in scores.items():
            norms[role] = norms.get(role, 0.0) + float(s.double().pow(2).sum())
    return {index: {role: s / (norms[role] ** 0.5 + 1e-8) for role, s in scores.items()}
            for index, scores in step_scores.items()}


def group_scores(scores: ModuleScores, n_rep: int) -> GroupScores:
    heads = scores["q_proj"] + scores["o_proj"]
    kv_groups = scores["k_proj"] + scores["v_proj"] + heads.view(-1, n_rep).sum(dim=1)
    channels = scores["gate_proj"] + scores["up_proj"] + scores["down_proj"]
    return GroupScores(heads=heads, kv_groups=kv_groups, channels=channels)


@dataclass(frozen=True)
class RemovalTarget:
    """What the pruning target removes from one layer, as a `forward_loss` criterion samples sub-models at it
    (the final allocation with ranking="local"; `hfprune.allocation.removal_targets`)."""

    kv_groups: int = 0  # whole KV groups (head_granularity="kv_group")
    heads_per_group: int = 0  # query heads inside every KV group (head_granularity="query_head")
    channels: int = 0  # MLP channels


class ImportanceCriterion:
    """Base class: subclass, set `name` and `needs`, implement `element_importance` (or `score_layer`).

    Everything the rest of hfprune asks of a criterion is declared here, with do-nothing defaults:

    * `needs` (see `Needs`): what the caller runs before `score_layer` (forward passes, a backward pass,
      full weight gradients, or the criterion's own forward passes through `sample_submodels`); it also
      decides whether a quantized base can be scored and whether a training step can score it;
    * `per_sample_gradients`: `prune_model` runs one backward pass per calibration *sequence* instead of one
      per batch, for criteria that square each pass's gradient (taylor2's and param_second's Fisher diagonal,
      LLM-Pruner's per-sample `acc_grad`); the scored gradient is the same mean either way. A training step
      has one backward pass per micro-batch, so there the squares are per micro-batch;
    * `loss_shares`: set by the caller: the backward passes between two scorings are shares of one mean loss
      that sum to the scored gradient (True: a Trainer step's micro-batches, `loss / gradient_accumulation_steps`,
      set by PruningCallback) or each its own mean loss, averaged by the caller (False: prune_model); criteria
      that square each pass's gradient rescale a share to its own mean;
    * `signed`: element scores are signed; the absolute value is taken once per group (LLM-Pruner's vector);
    * `seed`: set from `PruningConfig.seed` by `make_criterion`, for criteria that draw random numbers;
    * `enabled`: hook-based criteria record nothing while it is False (a distillation teacher's forward);
    * `prepare(model, layers)` before scoring starts (register hooks, unfreeze weights), idempotent;
      `release()` when scoring is over (remove hooks, freeze again); `reset()` drops what was recorded;
    * `work_buffers`: float32 buffers the size of the largest scored weight matrix alive while
      `score_layer` runs, and `weight_state_buffers`: buffers the size of every scored weight kept between
      steps (taylor2's Fisher diagonal), both for the memory estimator.
    """

    name: str = ""
    needs: Needs = "nothing"
    per_sample_gradients: bool = False
    loss_shares: bool = False
    signed: bool = False
    seed: int = 0
    enabled: bool = True
    work_buffers: int = 0
    weight_state_buffers: int = 0

    @property
    def needs_weight_gradients(self) -> bool:
        """Full gradients of the base weights: impossible on a quantized (int8 / 4-bit) base."""
        return self.needs == "weight_gradients"

    @property
    def scores_training_steps(self) -> bool:
        """Whether a training step gives this criterion what it needs (`PruningCallback`, `PruningTrainer`,
        recipes). A `forward_loss` criterion needs forward passes of its own, which a step does not run."""
        return self.needs != "forward_loss"

    def prepare(self, model: nn.Module, layers: list[LayerStructure]) -> None:
        """Called once before scoring (e.g. to unfreeze weights or register hooks)."""

    def sample_submodels(self, model: nn.Module, batches: list[dict], targets: Mapping[int, RemovalTarget]) -> None:
        """`needs="forward_loss"` only: run the criterion's own forward passes, once, after `prepare`.

        `prune_model` calls it in eval mode under `torch.no_grad()`, with the calibration batches (on the
        model's device, `labels` set) and what the target removes from each prunable layer (by layer index);
        `score_layer` then returns what the passes found.
        """
        raise NotImplementedError(f"{type(self).__name__} declares needs={self.needs!r}; only 'forward_loss' "
                                  "criteria sample sub-models")

    def release(self) -> None:
        """Called when scoring is over: undo what `prepare` did."""

    def reset(self) -> None:
        """Forget what was recorded since the last `score_layer`."""

    def element_importance(self, module: nn.Module, rows: slice) -> Optional[torch.Tensor]:
        """Element-wise importance of `module`'s weight rows `rows` ([len(rows), in], float32),
        or None when there is nothing to score (e.g. no gradient this step)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_layer(self, layer: LayerStructure) -> Optional[ModuleScores]:
        """Per-unit scores of each projection of `layer`, or None if this step has nothing to score."""
        scores: ModuleScores = {}
        for role, dim, unit in ROLES:
            module = layer.projection(role)
            out_features = base_layer(module).out_features
            per_index = None
            for start in range(0, out_features, ROW_BLOCK):
                rows = slice(start, min(start + ROW_BLOCK, out_features))
                importance = self.element_importance(module, rows)
                if importance is None:
                    return None
                if dim == 0:
                    block = importance.sum(dim=1)
                    per_index = block if per_index is None else torch.cat([per_index, block])
                else:
                    block = importance.sum(dim=0)
                    per_index = block if per_index is None else per_index + block
            scores[role] = reduce_to_units(per_index, unit, layer)
        return scores


_REGISTRY: dict[str, Callable[[], ImportanceCriterion]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the modules that register the built-in criteria (names.BUILTIN_CRITERIA), once."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # first: the modules call register_importance while they load
    for module in sorted(set(BUILTIN_CRITERIA.values())):
        importlib.import_module(f".{module}", __package__)  # each registers its names (tests/test_criteria.py)


def register_importance(name: str, factory: Optional[Callable[[], ImportanceCriterion]] = None, overwrite: bool = False):
    """Register a criterion class (or factory) under `name`; usable as a decorator."""
    _load_builtins()  # a user's name that clashes with a built-in one is refused, whatever was imported first

    def register(factory_: Callable[[], ImportanceCriterion]):
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"importance criterion {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = factory_
        return factory_

    return register(factory) if factory is not None else register


def available_importances() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def get_importance(name: str, **kwargs) -> ImportanceCriterion:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"importance={name!r}: unknown criterion; available: {', '.join(available_importances())}")
    criterion = _REGISTRY[name](**kwargs)
    if not isinstance(criterion, ImportanceCriterion):
        raise TypeError(f"importance={name!r}: the registered factory returned {type(criterion).__name__}, "
                        "not an hfprune.importance.ImportanceCriterion")
    if criterion.needs not in NEEDS:
        raise ValueError(f"importance={name!r}: needs={criterion.needs!r} must be one of {', '.join(NEEDS)}")
    return criterion
