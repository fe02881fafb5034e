"""Gradient-free criteria from activation statistics: Wanda-style `activation` and FLAP's `flap`.

A query head reaches the layer output only through its `head_dim` input
features of `o_proj`, an MLP channel only through its input feature of
`down_proj`. Both criteria watch those inputs during ordinary forward passes
(no backward, no gradient anywhere: they run under `torch.no_grad()`) and
combine per input feature `j` the statistics of `x_j` over tokens with the
matching weight column `W[:, j]`:

    activation  (Wanda, Sun et al. 2023)   Σ_i |W_ij| · ‖x_j‖      ‖x_j‖ = RMS of x_j over tokens
    flap        (FLAP, An et al. 2024)     Var_t(x_j) · ‖W_:,j‖²   the "fluctuation" of the feature

summed over the features of each head / channel. Only `o_proj` and
`down_proj` carry scores; the other projections get zeros, so
`group_scores` folds them into exactly these per-head and per-channel numbers.

The statistics are read by a forward hook, which sees the input *after* the
pruning masks (a pre-hook), so a masked group scores zero, as it would with a
gradient criterion. Under gradient checkpointing the forward runs again in the
backward pass; each hook counts its own tokens, so the means are unaffected.
`W` is the weight the forward uses: de-quantised int8 plus the active LoRA
update (`effective_weight`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..structure import base_layer
from .base import ROLES, ROW_BLOCK, ImportanceCriterion, ModuleScores, register_importance
from .weights import effective_weight

# Rows (tokens) per block when reducing an activation, so the float32 transient stays small.
TOKEN_BLOCK = 4096

# The projections whose input carries each unit's output: role -> unit.
CONSUMERS = (("o_proj", "head"), ("down_proj", "channel"))


def unit_width(layer, unit: str) -> int:
    """Input features per unit: `head_dim` for a head, 1 for a channel."""
    return layer.head_dim if unit == "head" else 1


def zero_scores(layer, device=None) -> ModuleScores:
    sizes = {"head": layer.num_heads, "kv": layer.num_kv_heads, "channel": layer.intermediate_size}
    return {role: torch.zeros(sizes[unit], device=device) for role, _, unit in ROLES}


class HookedCriterion(ImportanceCriterion):
    """A criterion that watches the inputs of o_proj / down_proj through module hooks.

    `prepare` is idempotent: it removes the hooks of an earlier call before
    installing new ones. `release()` removes them for good. `enabled = False`
    pauses them (e.g. during a distillation teacher's forward).
    """

    def __init__(self):
        self.enabled = True
        self._handles: list = []
        self._stats: dict[tuple[int, str], object] = {}

    def prepare(self, model: nn.Module, layers) -> None:
        self.release()
        for layer in layers:
            for role, unit in CONSUMERS:
                module = layer.projection(role)
                self._handles.append(self._install(module, (layer.index, role), unit_width(layer, unit)))

    def _install(self, module: nn.Module, key: tuple[int, str], width: int):
        raise NotImplementedError

    def release(self) -> None:
        """Remove every hook and drop the statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stats.clear()

    def reset(self) -> None:
        self._stats.clear()


class FeatureStats:
    """Running count, mean and sum of squared deviations of each input feature (Chan et al.'s merge),
    in float64 so the variance survives features with a large mean."""

    def __init__(self, features: int, device):
        self.count = 0
        self.mean = torch.zeros(features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        for start in range(0, rows.shape[0], TOKEN_BLOCK):
            block = rows[start : start + TOKEN_BLOCK].float()
            n = block.shape[0]
            mean = block.mean(dim=0)
            m2 = (block - mean).pow(2).sum(dim=0)
            total = self.count + n
            delta = mean.double() - self.mean
            self.mean += delta * (n / total)
            self.m2 += m2.double() + delta.pow(2) * (self.count * n / total)
            self.count = total

    @property
    def mean_square(self) -> torch.Tensor:
        return (self.m2 / self.count + self.mean.pow(2)).float()

    @property
    def variance(self) -> torch.Tensor:
        return (self.m2 / self.count).float()


def column_norms(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i |W_ij|, Σ_i W_ij²) for every input column j of the effective weight, read in row blocks."""
    linear = base_layer(module)
    l1 = torch.zeros(linear.in_features, device=linear.weight.device)
    l2 = torch.zeros(linear.in_features, device=linear.weight.device)
    for start in range(0, linear.out_features, ROW_BLOCK):
        weight = effective_weight(module, slice(start, min(start + ROW_BLOCK, linear.out_features)))
        l1 += weight.abs().sum(dim=0)
        l2 += weight.pow(2).sum(dim=0)
    return l1, l2


class ActivationStatisticsCriterion(HookedCriterion):
    """Shared machinery of `activation` and `flap`: forward hooks -> FeatureStats -> column combination."""

    needs = "forward"

    def _install(self, module, key, width):
        def hook(module, args, output):
            if not self.enabled:
                return
            x = args[0]
            stats = self._stats.get(key)
            if stats is None or stats.mean.numel() != x.shape[-1]:  # first use, or the layer was sliced
                stats = self._stats[key] = FeatureStats(x.shape[-1], x.device)
            stats.add(x)

        return module.register_forward_hook(hook)

    def feature_importance(self, stats: FeatureStats, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_layer(self, layer) -> Optional[ModuleScores]:
        found = [self._stats.get((layer.index, role)) for role, _ in CONSUMERS]
        if any(stats is None or stats.count == 0 for stats in found):
            return None
        scores = zero_scores(layer)
        for (role, unit), stats in zip(CONSUMERS, found):
            per_feature = self.feature_importance(stats, layer.projection(role)).cpu()
            scores[role] = per_feature.view(-1, unit_width(layer, unit)).sum(dim=1)
            del self._stats[(layer.index, role)]
        return scores


@register_importance("activation")
class ActivationImportance(ActivationStatisticsCriterion):
    """Wanda's |W|·‖x‖, summed over each group's input columns of o_proj / down_proj."""

    name = "activation"

    def feature_importance(self, stats, module):
        l1, _ = column_norms(module)
        return l1 * stats.mean_square.sqrt().to(l1.device)


@register_importance("flap")
class FlapImportance(ActivationStatisticsCriterion):
    """FLAP's fluctuation metric: Var_t(x_j)·‖W_:,j‖², summed over each group's input columns."""

    name = "flap"

    def feature_importance(self, stats, module):
        _, l2 = column_norms(module)
        return l2 * stats.variance.to(l2.device)
