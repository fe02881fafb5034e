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
within the per-layer floors (`min_heads`, `min_channels`) and, by default, within
`global_spread` of each layer's proportional share (no layer wiped out, none
left untouched); its scores are normalised per projection role across all
layers (`normalize="auto"`), so they stay comparable from layer to layer. Heads
and channels keep the split the local plan gives them (all heads' parameters,
then channels for the rest of the budget): the ranking moves each across layers,
never heads against channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .config import PruningConfig
from .importance import GroupScores, RemovalTarget
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
    """Greedy: lowest score per parameter first, within the floors and `global_spread`, until the budget is met."""
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

    taken: dict[int, float] = {layer.index: 0.0 for layer in layers}  # parameters each layer gave up

    def walk(pool: list, budget: float, layer_share: dict[int, float], removed: float = 0.0,
             forced: bool = False) -> float:
        """Take units in order of score per parameter until `budget`, no layer past its `layer_share`
        (with `forced`: every layer up to its share, lowest scores first, whatever the others')."""
        ordered = sorted(pool, key=lambda c: (c[1], c[0], c[2]) if forced else c[:3])
        for _, index, rank, cost, kind in ordered:
            plan, layer = plans[index], by_index[index]
            count = plan.head_units if kind == "heads" else plan.channels
            limit = _max_head_units(layer, config) if kind == "heads" else _max_channels(layer, config)
            # `rank == count`: units of a layer go in score order. A coarse head unit never overshoots
            # the budget; the fine channels then meet it to within half a channel.
            slack = cost / 2 if kind == "channels" else 0
            if rank != count or count >= limit or removed + cost > budget + slack:
                continue
            if taken[index] + cost > layer_share[index] + slack:
                continue
            if kind == "heads":
                plan.head_units += 1
            else:
                plan.channels += 1
            taken[index] += cost
            removed += cost
        return removed

    def bounded_walk(pool: list, budget: float, layer_params: dict[int, float]) -> None:
        """Global ranking within [1 - spread, 1 + spread] x each layer's proportional share of the budget."""
        total = sum(layer_params.values())
        share = {i: budget * p / total for i, p in layer_params.items()}
        spread = config.global_spread
        if spread is None:
            walk(pool, budget, {i: float("inf") for i in share})
            return
        removed = walk(pool, budget, {i: (1 - spread) * s for i, s in share.items()}, forced=True)
        walk(pool, budget, {i: (1 + spread) * s for i, s in share.items()}, removed)

    enabled = [kind for kind in ("heads", "channels") if kind in config.structures]
    if config.separate_targets:
        if "heads" in enabled and config.head_sparsity:
            bounded_walk(candidates["heads"], sum(config.head_sparsity * progress * l.attention_params for l in layers),
                         {l.index: l.attention_params for l in layers})
        if "channels" in enabled and config.channel_sparsity:
            for index in taken:
                taken[index] = 0.0
            bounded_walk(candidates["channels"], sum(config.channel_sparsity * progress * l.mlp_params for l in layers),
                         {l.index: l.mlp_params for l in layers})
    else:
        # Heads and channels keep the split the per-layer share gives them: their scores come from different
        # projections, normalised role by role, so they rank layers against layers but not a head against a
        # channel (one pool of both removed heads first and was 2.7x worse at 20% on SmolLM2, quality.py).
        # The ranking decides which layers give; the channels take whatever the coarse head units left.
        budget = config.target_sparsity * progress * sum(layer.attention_params + layer.mlp_params for layer in layers)
        if "heads" in enabled:
            head_params = {l.index: _final_local_plan(l, config).head_units * _head_unit(l, config.head_granularity)[2]
                           for l in layers}
            bounded_walk(candidates["heads"], progress * sum(head_params.values()),
                         {l.index: l.attention_params for l in layers})
        if "channels" in enabled:
            removed = sum(taken.values())
            for index in taken:
                taken[index] = 0.0
            bounded_walk(candidates["channels"], budget - removed, {l.index: l.mlp_params for l in layers})
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


def removal_targets(structure: ModelStructure, config: PruningConfig) -> dict[int, RemovalTarget]:
    """What the final target removes from each prunable layer with ranking="local": what a criterion that
    samples sub-models (bonsai) draws them at, whatever the ranking that later uses its scores."""
    targets = {}
    for layer in structure.prunable_layers:
        plan = _final_local_plan(layer, config)
        if config.head_granularity == "kv_group":
            targets[layer.index] = RemovalTarget(kv_groups=plan.head_units, channels=plan.channels)
        else:
            targets[layer.index] = RemovalTarget(heads_per_group=plan.head_units, channels=plan.channels)
    return targets


def check_feasible(structure: ModelStructure, config: PruningConfig) -> None:
    """Fail before training if the target cannot be reached within the floors and rounding.

    Every way a run could silently end far below what was asked and that the config and the model
    already decide is refused here (the split across layers of a global ranking depends on the scores;
    its totals do not): a layer the target asks to prune that would lose nothing, floors or rounding
    that cap a layer (or, with ranking="global", the whole model) short of the target, separate head /
    channel targets capped the same way. Within rounding: half a rounding step below is fine.
    """
    if not structure.prunable_layers:
        raise ValueError(
            f"protected_layers={sorted(structure.protected)} protects all {len(structure.layers)} layers: nothing to prune"
        )
    if config.uniform:
        shapes = {tuple(layer.widths().values()) for layer in structure.prunable_layers}
        if len(shapes) > 1:
            raise ValueError(f"uniform=True needs identical prunable layers; found widths {sorted(shapes)}")
    if config.separate_targets:
        _check_separate_targets(structure, config)
    elif config.ranking == "global":
        _check_global_target(structure, config)
    else:
        _check_local_target(structure, config)


def _settings(config: PruningConfig) -> str:
    text = f"structures={config.structures}"
    if "heads" in config.structures:
        text += f", head_granularity={config.head_granularity!r}, min_heads={config.min_heads}"
        if config.round_heads_to > 1:
            text += f", round_heads_to={config.round_heads_to}"
    if "channels" in config.structures:
        text += f", min_channels={config.min_channels}"
        if config.round_channels_to > 1:
            text += f", round_channels_to={config.round_channels_to}"
    return text


def _head_capacity(layer: LayerStructure, config: PruningConfig) -> int:
    """Head units the layer can lose at most (floors, the last unit, rounding)."""
    return _round_head_units(layer, config, _max_head_units(layer, config))


def _channel_capacity(layer: LayerStructure, config: PruningConfig) -> int:
    return _round_channels(layer, config, _max_channels(layer, config))


def _head_limits(layer: LayerStructure, config: PruningConfig) -> str:
    """Why a layer can lose no head unit, when it cannot; else ""."""
    if _head_capacity(layer, config):
        return ""
    if config.head_granularity == "query_head" and layer.n_rep == 1:
        return (f"; layer {layer.index} has one query head per KV group ({layer.num_heads} heads, {layer.num_kv_heads} "
                "KV heads), so head_granularity='query_head' cannot remove any: use head_granularity='kv_group'")
    if config.head_granularity == "kv_group" and layer.num_kv_heads == 1:
        return (f"; layer {layer.index} has a single KV group, which is never removed: use "
                "head_granularity='query_head'")
    return f"; layer {layer.index} keeps all {layer.num_heads} query heads under these floors and rounding"


def _channel_limits(layer: LayerStructure, config: PruningConfig) -> str:
    if _channel_capacity(layer, config):
        return ""
    if config.round_channels_to >= layer.intermediate_size:
        return (f"; round_channels_to={config.round_channels_to} is not below layer {layer.index}'s "
                f"{layer.intermediate_size} MLP channels, so rounding keeps them all: use a smaller multiple")
    return f"; layer {layer.index} keeps all {layer.intermediate_size} MLP channels under these floors and rounding"


def _limits(layer: LayerStructure, config: PruningConfig) -> str:
    heads = _head_limits(layer, config) if "heads" in config.structures else ""
    channels = _channel_limits(layer, config) if "channels" in config.structures else ""
    return heads + channels


def _rounding_tolerance(layer: LayerStructure, config: PruningConfig) -> float:
    """Parameters a layer may fall short by from rounding alone: half of its finest removal step."""
    if "channels" in config.structures:
        return layer.params_per_channel * (config.round_channels_to + 1) / 2
    _, _, unit_params = _head_unit(layer, config.head_granularity)
    return unit_params / 2


def _check_local_target(structure: ModelStructure, config: PruningConfig) -> None:
    for layer in structure.prunable_layers:
        plan = _final_local_plan(layer, config)
        _, _, unit_params = _head_unit(layer, config.head_granularity)
        params = layer.attention_params + layer.mlp_params
        reached = plan.head_units * unit_params + plan.channels * layer.params_per_channel
        wanted = config.target_sparsity * params
        if wanted > 0 and reached == 0 and "channels" not in config.structures and _head_capacity(layer, config):
            raise ValueError(
                f"target_sparsity={config.target_sparsity} with structures={config.structures}: one head unit "
                f"({config.head_granularity}) is {unit_params / params:.3f} of layer {layer.index}'s parameters, so "
                "the target rounds to none and nothing would be removed; ask for at least "
                f"{unit_params / params / 2:.3f} (half a unit), use a finer head_granularity, or add 'channels'"
            )
        if wanted - reached > _rounding_tolerance(layer, config) or (wanted > 0 and reached == 0):
            raise ValueError(
                f"target_sparsity={config.target_sparsity}: layer {layer.index} can give up at most "
                f"{reached / params:.3f} of its parameters with {_settings(config)}{_limits(layer, config)}; "
                "lower the target, allow more structures or lower the floors"
            )


def _check_global_target(structure: ModelStructure, config: PruningConfig) -> None:
    """A global ranking splits the budget by score, but never past any layer's floors: the floors bound the total.
    It takes whole units while they fit the budget, so heads alone reach it to within one unit."""
    layers = structure.prunable_layers
    prunable = sum(layer.attention_params + layer.mlp_params for layer in layers)
    wanted = config.target_sparsity * prunable
    capacity = 0
    for layer in layers:
        if "heads" in config.structures:
            capacity += _head_capacity(layer, config) * _head_unit(layer, config.head_granularity)[2]
        if "channels" in config.structures:
            capacity += _channel_capacity(layer, config) * layer.params_per_channel
    if "channels" in config.structures:
        step = max(_rounding_tolerance(layer, config) for layer in layers)
        reachable = capacity
    else:
        step = min(_head_unit(layer, config.head_granularity)[2] for layer in layers)
        reachable = min(capacity, math.floor(wanted / step + 1e-9) * step)
    if wanted > 0 and reachable == 0 and capacity > 0:
        raise ValueError(
            f"target_sparsity={config.target_sparsity} with ranking='global' and structures={config.structures}: "
            f"one head unit ({config.head_granularity}) is {step / prunable:.4f} of the prunable parameters, more than "
            f"the target, so nothing would be removed; ask for at least {step / prunable:.4f}, use a finer "
            "head_granularity, or add 'channels'"
        )
    if wanted - reachable > step or (wanted > 0 and capacity == 0):
        limits = next((found for found in (_limits(layer, config) for layer in layers) if found), "")
        raise ValueError(
            f"target_sparsity={config.target_sparsity} with ranking='global': the prunable layers can give up at "
            f"most {capacity / prunable:.3f} of their parameters together with {_settings(config)}{limits}; lower "
            "the target, allow more structures or lower the floors"
        )


def _check_separate_targets(structure: ModelStructure, config: PruningConfig) -> None:
    """head_sparsity / channel_sparsity: each structure type reaches its own target in every layer (local) or
    in total (global)."""
    layers = structure.prunable_layers
    checks = []
    if "heads" in config.structures and config.head_sparsity:
        checks.append(("head_sparsity", config.head_sparsity, "query heads"))
    if "channels" in config.structures and config.channel_sparsity:
        checks.append(("channel_sparsity", config.channel_sparsity, "MLP channels"))
    for name, asked, kind in checks:
        heads = name == "head_sparsity"
        if config.ranking == "global":
            units = sum(_head_unit(l, config.head_granularity)[0] if heads else l.intermediate_size for l in layers)
            capacity = sum(_head_capacity(l, config) if heads else _channel_capacity(l, config) for l in layers)
            if asked * units - capacity > (0.5 if heads else (config.round_channels_to + 1) / 2) or capacity == 0:
                limiting = _head_limits if heads else _channel_limits
                limits = next((found for found in (limiting(l, config) for l in layers) if found), "")
                raise ValueError(
                    f"{name}={asked} with ranking='global': the prunable layers can give up at most "
                    f"{capacity / units:.3f} of their {kind} together with {_settings(config)}{limits}; lower "
                    f"{name} or the floors"
                )
            continue
        for layer in layers:
            plan = _final_local_plan(layer, config)
            units = _head_unit(layer, config.head_granularity)[0] if heads else layer.intermediate_size
            removed = plan.head_units if heads else plan.channels
            capacity = _head_capacity(layer, config) if heads else _channel_capacity(layer, config)
            half_step = 0.5 if heads else (config.round_channels_to + 1) / 2
            if removed == 0 and capacity > 0:
                raise ValueError(
                    f"{name}={asked}: rounds down to no {kind} in layer {layer.index} (one "
                    f"{config.head_granularity + ' unit' if heads else 'channel'} is {1 / units:.3f} of them); ask for "
                    f"at least {1 / units:.3f}" + (", or use a finer head_granularity" if heads else "")
                )
            if asked * units - removed > half_step or removed == 0:
                limits = (_head_limits if heads else _channel_limits)(layer, config)
                unit = (f"; one {config.head_granularity} unit is {1 / units:.3f} of its query heads, and the "
                        "reachable fractions are its multiples") if heads and not limits else ""
                raise ValueError(
                    f"{name}={asked}: layer {layer.index} can give up at most {removed / units:.3f} of its {kind} "
                    f"with {_settings(config)}{limits or unit}; lower {name} or the floors"
                )


def target_fraction(structure: ModelStructure, config: PruningConfig) -> float:
    """The target as a fraction of the prunable parameters (derived when heads/channels have their own)."""
    if not config.separate_targets:
        return config.target_sparsity
    wanted = 0.0
    for layer in structure.prunable_layers:
        if "heads" in config.structures:
            wanted += (config.head_sparsity or 0.0) * layer.attention_params
        if "channels" in config.structures:
            wanted += (config.channel_sparsity or 0.0) * layer.mlp_params
    return wanted / max(1, structure.prunable_params())


def shortfall(structure: ModelStructure, masks: PruningMasks, config: PruningConfig) -> Optional[str]:
    """A warning when the final `masks` remove clearly less than `config` asks of `structure` (more than
    rounding explains), else None. `check_feasible` refuses what the config decides up front; this catches
    what only the scores decide (how a global ranking splits the budget)."""
    from .sparsity import removed_params

    prunable = structure.prunable_params()
    reached = removed_params(structure, masks)
    target = target_fraction(structure, config)
    tolerance = sum(_rounding_tolerance(layer, config) for layer in structure.prunable_layers)
    if "channels" not in config.structures:
        tolerance += max(_head_unit(layer, config.head_granularity)[2] for layer in structure.prunable_layers)
    if target * prunable - reached <= tolerance:
        return None
    return (
        f"reached sparsity {reached / max(1, prunable):.4f} of the prunable parameters is short of the target "
        f"{target:.4f} by more than rounding explains ({_settings(config)}, ranking={config.ranking!r}): too few "
        "groups were removable within the floors; lower the target or the floors"
    )
