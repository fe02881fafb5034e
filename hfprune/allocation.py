"""Decide which groups go: from scores and a sparsity level to keep-masks.

`allocate(structure, scores, config, progress)` returns the masks for
`progress` (a fraction of the final target, from the schedule); `scores` maps
each prunable layer's index to its `GroupScores` (`ScoreAccumulator.layer_scores`). Removal is
monotone: a group removed at one update stays removed.

Units of removal per layer:
  * heads, granularity "kv_group": a KV group (k and v head + its n_rep query heads);
  * heads, granularity "query_head": one query head *from every KV group* (each
    group drops its lowest-scoring remaining head), so all KV groups keep the
    same number of query heads and the layer stays a valid GQA layer;
  * channels: one MLP channel.

"local" ranking (LoRAPrune) removes the same share of parameters from every
prunable layer: KV groups / head levels first (rounded down, they are coarse),
then MLP channels up to the layer's exact parameter budget. "global" ranking
takes units across all prunable layers in order of score per parameter removed,
within the per-layer floors (`min_heads`, `min_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .config import PruningConfig
from .importance import GroupScores
from .masking import LayerMask, PruningMasks
from .structure import LayerStructure, ModelStructure


@dataclass
class _LayerPlan:
    """How many units one layer gives up."""

    head_units: int = 0
    channels: int = 0


def _head_unit(layer: LayerStructure, granularity: str) -> tuple[int, int, int]:
    """(number of head units, query heads per unit, parameters per unit)."""
    if granularity == "kv_group":
        return layer.num_kv_heads, layer.n_rep, layer.params_per_kv_head + layer.n_rep * layer.params_per_query_head
    return layer.n_rep, layer.num_kv_heads, layer.num_kv_heads * layer.params_per_query_head


def _max_head_units(layer: LayerStructure, config: PruningConfig) -> int:
    units, heads_per_unit, _ = _head_unit(layer, config.head_granularity)
    limit = (layer.num_heads - config.min_heads) // heads_per_unit
    limit = min(limit, units - 1)  # never the last unit
    return max(0, limit)


def _round_head_units(layer: LayerStructure, config: PruningConfig, removed: int) -> int:
    """Fewer units until the kept query heads are a multiple of `round_heads_to`."""
    _, heads_per_unit, _ = _head_unit(layer, config.head_granularity)
    while removed > 0 and (layer.num_heads - removed * heads_per_unit) % config.round_heads_to:
        removed -= 1
    return removed


def _round_channels(layer: LayerStructure, config: PruningConfig, removed: int) -> int:
    """Kept channels to the nearest multiple of `round_channels_to`, within the floor."""
    if removed <= 0:
        return 0
    multiple = config.round_channels_to
    kept = layer.intermediate_size - removed
    kept = max(multiple, int(round(kept / multiple)) * multiple)
    kept = max(kept, -(-config.min_channels // multiple) * multiple)
    return max(0, layer.intermediate_size - kept)


def _max_channels(layer: LayerStructure, config: PruningConfig) -> int:
    return max(0, layer.intermediate_size - config.min_channels)


def _local_plan(layer: LayerStructure, config: PruningConfig, progress: float) -> _LayerPlan:
    """The layer's final allocation, scaled by `progress`.

    Scaling the *final* head and channel counts (rather than re-splitting a growing
    budget at every update) keeps the removal monotone and lands exactly on the
    target: coarse KV groups would otherwise enter late and overshoot it.
    """
    final = _final_local_plan(layer, config)
    if progress >= 1.0:
        return final
    plan = _LayerPlan(head_units=int(round(progress * final.head_units)), channels=int(round(progress * final.channels)))
    plan.head_units = _round_head_units(layer, config, plan.head_units)
    plan.channels = _round_channels(layer, config, plan.channels)
    return plan


def _final_local_plan(layer: LayerStructure, config: PruningConfig) -> _LayerPlan:
    units, _, unit_params = _head_unit(layer, config.head_granularity)
    plan = _LayerPlan()
    heads_on = "heads" in config.structures
    channels_on = "channels" in config.structures
    if config.separate_targets:
        if heads_on and config.head_sparsity:
            plan.head_units = int(config.head_sparsity * units + 1e-9)
        if channels_on and config.channel_sparsity:
            plan.channels = int(config.channel_sparsity * layer.intermediate_size + 1e-9)
    else:
        budget = config.target_sparsity * (layer.attention_params + layer.mlp_params)
        if heads_on and channels_on:
            plan.head_units = int(config.target_sparsity * units + 1e-9)
        elif heads_on:
            plan.head_units = int(round(budget / unit_params))
        plan.head_units = _round_head_units(layer, config, min(plan.head_units, _max_head_units(layer, config)))
        if channels_on:
            remaining = budget - plan.head_units * unit_params
            plan.channels = int(round(max(0.0, remaining) / layer.params_per_channel))
    plan.head_units = _round_head_units(layer, config, min(plan.head_units, _max_head_units(layer, config)))
    plan.channels = _round_channels(layer, config, min(plan.channels, _max_channels(layer, config)))
    return plan


def _global_plans(
    layers: list[LayerStructure], scores: dict[int, GroupScores], config: PruningConfig, progress: float, previous
) -> dict[int, _LayerPlan]:
    """Greedy: lowest score per parameter first, within the floors, until the budget is met."""
    plans = {layer.index: _LayerPlan() for layer in layers}
    by_index = {layer.index: layer for layer in layers}
    candidates: dict[str, list] = {"heads": [], "channels": []}
    for layer in layers:
        _, _, unit_params = _head_unit(layer, config.head_granularity)
        head_scores = _head_unit_scores(layer, scores[layer.index], config, previous[layer.index])
        for rank, score in enumerate(sorted(head_scores.tolist())):
            candidates["heads"].append((score / unit_params, layer.index, rank, unit_params, "heads"))
        channel_scores = torch.where(previous[layer.index].channels, scores[layer.index].channels, -torch.inf)
        for rank, score in enumerate(sorted(channel_scores.tolist())):
            cost = layer.params_per_channel
            candidates["channels"].append((score / cost, layer.index, rank, cost, "channels"))

    def walk(pool: list, budget: float) -> None:
        removed = 0
        for _, index, rank, cost, kind in sorted(pool, key=lambda c: c[:3]):
            plan, layer = plans[index], by_index[index]
            count = plan.head_units if kind == "heads" else plan.channels
            limit = _max_head_units(layer, config) if kind == "heads" else _max_channels(layer, config)
            # `rank == count`: units of a layer go in score order. A coarse head unit never overshoots
            # the budget; the fine channels then meet it to within half a channel.
            slack = cost / 2 if kind == "channels" else 0
            if rank != count or count >= limit or removed + cost > budget + slack:
                continue
            if kind == "heads":
                plan.head_units += 1
            else:
                plan.channels += 1
            removed += cost

    enabled = [kind for kind in ("heads", "channels") if kind in config.structures]
    if config.separate_targets:
        if "heads" in enabled and config.head_sparsity:
            walk(candidates["heads"], sum(config.head_sparsity * progress * l.attention_params for l in layers))
        if "channels" in enabled and config.channel_sparsity:
            walk(candidates["channels"], sum(config.channel_sparsity * progress * l.mlp_params for l in layers))
    else:
        prunable = sum(layer.attention_params + layer.mlp_params for layer in layers)
        walk([c for kind in enabled for c in candidates[kind]], config.target_sparsity * progress * prunable)
    for layer in layers:
        plan = plans[layer.index]
        plan.head_units = _round_head_units(layer, config, plan.head_units)
        plan.channels = _round_channels(layer, config, plan.channels)
    return plans


def _head_unit_scores(layer: LayerStructure, scores: GroupScores, config: PruningConfig, previous: LayerMask):
    """Score of each head unit, already-removed units at -inf so they stay removed."""
    if config.head_granularity == "kv_group":
        kept = previous.kv_groups(layer.num_kv_heads)
        return torch.where(kept, scores.kv_groups, -torch.inf)
    # Level j removes the j-th lowest head of every group: its score is the sum over groups.
    per_group = torch.where(previous.heads, scores.heads, -torch.inf).view(layer.num_kv_heads, layer.n_rep)
    return per_group.sort(dim=1).values.sum(dim=0)


def _layer_mask(layer: LayerStructure, scores: GroupScores, config: PruningConfig, plan: _LayerPlan, previous: LayerMask):
    heads = torch.ones(layer.num_heads, dtype=torch.bool)
    if plan.head_units:
        if config.head_granularity == "kv_group":
            order = torch.argsort(_head_unit_scores(layer, scores, config, previous), stable=True)
            groups = heads.view(layer.num_kv_heads, layer.n_rep)
            groups[order[: plan.head_units]] = False
        else:
            per_group = torch.where(previous.heads, scores.heads, -torch.inf).view(layer.num_kv_heads, layer.n_rep)
            order = torch.argsort(per_group, dim=1, stable=True)[:, : plan.head_units]
            heads.view(layer.num_kv_heads, layer.n_rep).scatter_(1, order, False)
    channels = torch.ones(layer.intermediate_size, dtype=torch.bool)
    if plan.channels:
        channel_scores = torch.where(previous.channels, scores.channels, -torch.inf)
        channels[torch.argsort(channel_scores, stable=True)[: plan.channels]] = False
    return LayerMask(heads, channels)


def allocate(
    structure: ModelStructure,
    scores: Mapping[int, GroupScores],
    config: PruningConfig,
    progress: float,
    previous: Optional[PruningMasks] = None,
) -> PruningMasks:
    """Masks reaching `progress` (0..1) of the final target, never restoring a removed group.

    `scores`: the group scores of every prunable layer, by layer index.
    """
    previous = previous or PruningMasks.full(structure)
    masks = PruningMasks({i: m.clone() for i, m in previous.layers.items()})
    layers = structure.prunable_layers
    missing = [layer.index for layer in layers if layer.index not in scores]
    if missing:
        raise ValueError(f"scores have no entry for the prunable layers {missing}")
    layer_scores = {layer.index: scores[layer.index] for layer in layers}
    if config.ranking == "global":
        plans = _global_plans(layers, layer_scores, config, progress, previous)
    else:
        plans = {layer.index: _local_plan(layer, config, progress) for layer in layers}
    for layer in layers:
        prev = previous[layer.index]
        already_heads = layer.num_heads - int(prev.heads.sum())
        already_channels = layer.intermediate_size - int(prev.channels.sum())
        plan = plans[layer.index]
        _, heads_per_unit, _ = _head_unit(layer, config.head_granularity)
        # Monotone: never fewer removed than before.
        plan.head_units = max(plan.head_units, already_heads // heads_per_unit)
        plan.channels = max(plan.channels, already_channels)
        masks.layers[layer.index] = _layer_mask(layer, layer_scores[layer.index], config, plan, prev)
    return masks


def check_feasible(structure: ModelStructure, config: PruningConfig) -> None:
    """Fail before training if the target cannot be reached within the floors and rounding."""
    if not structure.prunable_layers:
        raise ValueError(
            f"protected_layers={sorted(structure.protected)} protects all {len(structure.layers)} layers: nothing to prune"
        )
    if config.uniform:
        shapes = {tuple(layer.widths().values()) for layer in structure.prunable_layers}
        if len(shapes) > 1:
            raise ValueError(f"uniform=True needs identical prunable layers; found widths {sorted(shapes)}")
    if config.separate_targets or config.ranking == "global":
        return
    for layer in structure.prunable_layers:
        plan = _final_local_plan(layer, config)
        _, _, unit_params = _head_unit(layer, config.head_granularity)
        reached = plan.head_units * unit_params + plan.channels * layer.params_per_channel
        wanted = config.target_sparsity * (layer.attention_params + layer.mlp_params)
        slack = max(unit_params if "channels" not in config.structures else 0, layer.params_per_channel * config.round_channels_to)
        if reached + slack < wanted:
            raise ValueError(
                f"target_sparsity={config.target_sparsity}: layer {layer.index} can give up at most "
                f"{reached / (layer.attention_params + layer.mlp_params):.3f} of its parameters with "
                f"structures={config.structures}, min_heads={config.min_heads}, min_channels={config.min_channels}; "
                "lower the target, allow more structures or lower the floors"
            )
