"""Molchanov et al.'s feature-map Taylor saliency (ICLR 2017), per head and per MLP channel.

Removing a group zeroes its output: an MLP channel's activation `z = act(gate)·up`
(one input feature of down_proj), or a query head's attention output (its
`head_dim` input features of o_proj). To first order the loss changes by

    ΔL ≈ −Σ_t s_t,     s_t = Σ_{features of the unit} z_t · ∂L/∂z_t

over the tokens t. Two reductions, over everything since the last scoring:

    activation_taylor      mean over sequences of |mean_t s_t|   Molchanov's absolute mean
    activation_taylor_sq   mean over tokens of s_t²              the squared (Fisher-like) variant

Molchanov et al. take the absolute value per example ("computed for each
example separately and averaged"), here per sequence. That matters: the
absolute value of one mean over *all* tokens lets contributions of opposite
sign cancel, and on the removal oracle (benchmarks/oracle_ranking.py) it ranks
query heads far worse (Spearman 0.34 against 0.80 per sequence).

Only the gradient of activations is needed, never of a weight: backpropagation
reaches every activation whenever anything upstream is trainable, so this works
on a frozen 8-bit base with LoRA adapters at no extra memory.

How: a forward pre-hook on the outermost o_proj / down_proj passes the input
through an identity autograd function that saves it and, in its backward,
accumulates z·g. Accumulating in the backward (never in the forward) keeps the
count right under gradient checkpointing, whose forward runs twice; and because
z is a saved tensor of an autograd node, checkpointing frees and recomputes it
like any other activation instead of a hook pinning it in memory. The hook is a
no-op under `torch.no_grad()` (evaluation, a distillation teacher's forward) and
when the input does not require grad. With pruning masks installed after it
(the callback prepares criteria first), a masked unit gets a zero gradient and
so a zero score.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activation import CONSUMERS, TOKEN_BLOCK, HookedCriterion, zero_scores
from .base import ModuleScores, register_importance


class UnitTaylorSums:
    """Per unit, since the last scoring: Σ over sequences of |mean_t s_t|, Σ over tokens of s_t², and the counts."""

    def __init__(self, units: int, device):
        self.abs_means = torch.zeros(units, dtype=torch.float64, device=device)
        self.squares = torch.zeros(units, dtype=torch.float64, device=device)
        self.sequences = 0
        self.tokens = 0

    def add(self, z: torch.Tensor, grad: torch.Tensor, width: int) -> None:
        # [sequences, tokens, features]; a 2-D input is one sequence.
        seq_len = z.shape[-2] if z.dim() >= 3 else z.shape[0]
        z = z.reshape(-1, seq_len, z.shape[-1])
        grad = grad.reshape(-1, seq_len, grad.shape[-1])
        step = max(1, TOKEN_BLOCK // seq_len)
        for start in range(0, z.shape[0], step):
            per_feature = z[start : start + step].float() * grad[start : start + step].float()
            s = per_feature.view(*per_feature.shape[:2], -1, width).sum(dim=3)  # s_t: [sequences, tokens, units]
            self.abs_means += s.mean(dim=1).abs().sum(dim=0).double()
            self.squares += s.pow(2).sum(dim=(0, 1)).double()
        self.sequences += z.shape[0]
        self.tokens += z.shape[0] * seq_len


class _Probe(torch.autograd.Function):
    """Identity in the forward; in the backward hands (z, ∂L/∂z) to the criterion."""

    @staticmethod
    def forward(ctx, z, sink):
        ctx.save_for_backward(z)
        ctx.sink = sink
        return z.view_as(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        ctx.sink(z, grad)
        return grad, None


@register_importance("activation_taylor")
class ActivationTaylorImportance(HookedCriterion):
    name = "activation_taylor"
    needs = "activation_gradients"
    squared = False

    def _install(self, module: nn.Module, key: tuple[int, str], width: int):
        def sink(z: torch.Tensor, grad: torch.Tensor) -> None:
            if not self.enabled:
                return
            units = z.shape[-1] // width
            sums = self._stats.get(key)
            if sums is None or sums.squares.numel() != units:  # first use, or the layer was sliced
                sums = self._stats[key] = UnitTaylorSums(units, z.device)
            with torch.no_grad():
                sums.add(z.detach(), grad.detach(), width)

        def pre_hook(module, args):
            z = args[0]
            if not (self.enabled and torch.is_grad_enabled() and z.requires_grad):
                return None
            return (_Probe.apply(z, sink),) + tuple(args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def reduce(self, sums: UnitTaylorSums) -> torch.Tensor:
        if self.squared:
            return (sums.squares / sums.tokens).float()
        return (sums.abs_means / sums.sequences).float()

    @torch.no_grad()
    def score_layer(self, layer) -> Optional[ModuleScores]:
        found = [self._stats.get((layer.index, role)) for role, _ in CONSUMERS]
        if any(sums is None or sums.tokens == 0 for sums in found):
            return None
        scores = zero_scores(layer)
        for (role, unit), sums in zip(CONSUMERS, found):
            expected = scores[role].numel()
            if sums.squares.numel() != expected:
                raise RuntimeError(
                    f"layer {layer.index} {role}: accumulated {sums.squares.numel()} units but the layer has {expected}; "
                    f"was it sliced without calling prepare() again?"
                )
            scores[role] = self.reduce(sums).cpu()
            del self._stats[(layer.index, role)]
        return scores


@register_importance("activation_taylor_sq")
class SquaredActivationTaylorImportance(ActivationTaylorImportance):
    name = "activation_taylor_sq"
    squared = True
