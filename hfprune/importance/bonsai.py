"""Bonsai (Kolawole, Dery et al. 2024, "Everybody Prune Now: Structured Pruning of LLMs with only Forward
Passes"): importance from the losses of sampled sub-models, forward passes only.

Each round draws `samples` sub-models at the target: from every prunable layer, as many units (MLP channels,
KV groups or query heads, per `head_granularity`) as the target removes there are masked out. Each sub-model's
loss on the same calibration sequences is measured (no gradient anywhere, so inference memory: it runs on an
8-bit or 4-bit base), and the loss is regressed on which units each sub-model kept,

    loss_s ≈ c − Σ_u β_u · keep_{s,u}        ridge-regularised, one coefficient per unit,

so `β_u` is, in loss units, what keeping unit u is worth: its score. As in the paper:

* a prior focuses the samples: a forward-only criterion (`prior`, Wanda-style `activation` by default) ranks
  the units on the unmasked model; only the `2·d` lowest of a layer (d = what the target removes there) are
  candidates, the others are kept in every sub-model and score above the candidates. Candidates are dropped
  with probability rising as their prior falls, each sample paired with its complement among the candidates
  (which drops the other d), halving the variance;
* rounds (`rounds` > 1): each round removes its share of the target (the lowest scores), later rounds sample
  the remaining units of the model without them, and units removed earlier score below those removed later.

The ridge is centred on the prior, in the dual form (samples ≪ units):

    β = β₀ + D·Xᵀ(X·D·Xᵀ + I)⁻¹(y − X·β₀),    β₀ = a·prior

X the centred keep indicators of the candidates, y the centred negative losses, D the inverse penalties:
`ridge` (per unit kind, heads and channels apart) times the mean squared row norm of that kind's columns,
chosen among 0.01..100 by 5-fold cross-validation when `ridge=None` (the paper searches its regulariser the
same way). `a` puts the prior in loss units: the prior of the units a sub-model drops accounts, on average,
for its loss increase over the unmasked model. Where the samples cannot resolve single units (the usual case:
hundreds of candidates per layer, tens of samples) the scores stay near the prior; the data moves them.

Where the paper regresses perplexity with an iterative (SGD) fit and a Kendall-tau model selection, this
regresses the loss (additive in log-perplexity) with the closed form. It scores only with `prune_model`:
the sub-models' passes are its own, which a training step does not run (`scores_training_steps` is False).
Cost: `rounds · (samples + 1)` forward passes over `sequences` calibration sequences. Measured on
SmolLM2-135M: see the README's criteria table.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from .activation import zero_scores
from .base import ImportanceCriterion, ModuleScores, RemovalTarget, group_scores, register_importance

logger = logging.getLogger(__name__)

#: Grid of λ (times the mean diagonal of XXᵀ) searched by cross-validation when `ridge` is None.
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
FOLDS = 5


@dataclass
class UnitSet:
    """One kind of unit of one layer: what is sampled, what is known of it, what it scores."""

    layer: int
    kind: str  # "kv_group", "head" or "channel"
    size: int
    drop: int  # units the whole target removes here
    alive: torch.Tensor  # bool [size]: not removed by an earlier round
    prior: torch.Tensor = None  # [size]
    scores: torch.Tensor = None  # [size], of the latest round
    removed: list = field(default_factory=list)  # per earlier round: the indices it removed


def _check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}" + (" or None" if optional else ""))


@register_importance("bonsai")
class BonsaiImportance(ImportanceCriterion):
    """Bonsai's regression of sub-model losses on their unit masks (module docstring).

    Args:
        samples: sub-models per round (in complement pairs when the candidates allow); the paper uses 200
            per round on a GPU. The defaults (32 sub-models on 8 sequences) prune SmolLM2-135M in 5-7 minutes
            on a busy 2-core CPU and measured best of the settings tried there (README).
        rounds: rounds, each removing its share of the target (the paper prunes 5% per round).
        sequences: calibration sequences each sub-model is evaluated on (the same ones every time), the
            first ones of the calibration data; None: all of them.
        ridge: λ as a multiple of the mean diagonal of XXᵀ (> 0); None: chosen by cross-validation.
        prior: a registered criterion that needs only weights or forward passes (`activation`, `flap`,
            `magnitude`), or None: no prior, every unit is a candidate, drawn uniformly, ridge centred on 0.
    """

    name = "bonsai"
    needs = "forward_loss"

    def __init__(self, samples: int = 32, rounds: int = 1, sequences: Optional[int] = 8,
                 ridge: Optional[float] = None, prior: Optional[str] = "activation"):
        _check_int("samples", samples, 2)
        _check_int("rounds", rounds, 1)
        _check_int("sequences", sequences, 1, optional=True)
        if ridge is not None and (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
                                  or not math.isfinite(ridge) or ridge <= 0):
            raise ValueError(f"ridge={ridge!r}: must be a finite number > 0, or None (cross-validated)")
        if prior is not None:
            from .base import available_importances, get_importance

            if prior not in available_importances():
                raise ValueError(f"prior={prior!r}: unknown criterion; available: {', '.join(available_importances())}")
            needs = get_importance(prior).needs
            if needs not in ("nothing", "forward"):
                raise ValueError(f"prior={prior!r} needs {needs!r}: a prior must score from weights or forward "
                                 "passes alone (activation, flap, magnitude), or be None")
        self.samples, self.rounds, self.sequences, self.ridge, self.prior = samples, rounds, sequences, ridge, prior
        self._layers: dict = {}
        self._sets: dict[tuple[int, str], UnitSet] = {}
        self._keep: dict[tuple[int, str], torch.Tensor] = {}  # input-feature masks of o_proj / down_proj
        self._handles: list = []
        self._prior_criterion: Optional[ImportanceCriterion] = None
        self.history: list[dict] = []  # per round: losses, λ, prior scales, seconds

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, layers) -> None:
        self.release()
        self._layers = {layer.index: layer for layer in layers}
        for layer in layers:
            for role in ("o_proj", "down_proj"):
                self._handles.append(layer.projection(role).register_forward_pre_hook(self._mask_hook((layer.index, role))))

    def _mask_hook(self, key):
        def hook(module, args):
            keep = self._keep.get(key)
            if keep is None:
                return None
            x = args[0]
            return (x * keep.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return hook

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keep.clear()
        if self._prior_criterion is not None:
            self._prior_criterion.release()
            self._prior_criterion = None

    def reset(self) -> None:
        self._sets.clear()

    # ---- sampling ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_submodels(self, model: nn.Module, batches: list[dict], targets: Mapping[int, RemovalTarget]) -> None:
        missing = [index for index in self._layers if index not in targets]
        if not self._layers or missing:
            raise RuntimeError(f"bonsai: prepare() the prunable layers first, and give a target for each "
                               f"(missing: {missing})")
        evaluation = _first_sequences(batches, self.sequences)
        self._sets = self._unit_sets(targets)
        generator = torch.Generator().manual_seed(self.seed)
        self.history = []
        try:
            for round_ in range(1, self.rounds + 1):
                started = time.perf_counter()
                self._set_keep({})
                dense_loss = self._prior_scores(model, evaluation)
                drops = self._round_drops(round_)
                candidates = {key: self._candidates(unit_set, drops[key]) for key, unit_set in self._sets.items()}
                masks, losses = [], []
                for sample in range(self.samples if any(drops.values()) else 0):  # nothing to remove: the prior
                    if sample % 2 == 1 and all(_complementable(c, drops[k]) for k, c in candidates.items() if drops[k]):
                        drop = {k: c[~torch.isin(c, masks[-1][k])] for k, c in candidates.items() if drops[k]}
                    else:
                        drop = {k: _draw(self._sets[k], c, drops[k], generator) for k, c in candidates.items() if drops[k]}
                    masks.append(drop)
                    self._set_keep(drop)
                    losses.append(_mean_loss(model, evaluation))
                self._set_keep({})
                losses = losses or [dense_loss]
                fit = self._fit(candidates, masks, torch.tensor(losses, dtype=torch.float64), dense_loss)
                self._assign_scores(candidates, fit)
                if round_ < self.rounds:
                    self._remove_lowest(drops)
                self.history.append({
                    "round": round_, "dense_loss": dense_loss, "mean_sampled_loss": float(sum(losses) / len(losses)),
                    "ridge": fit["ridge"], "prior_scale": fit["scale"], "heldout_mse": fit["heldout_mse"],
                    "seconds": round(time.perf_counter() - started, 2),
                })
                logger.info("bonsai round %d/%d: %s", round_, self.rounds, self.history[-1])
        finally:
            self._set_keep({})

    def _unit_sets(self, targets: Mapping[int, RemovalTarget]) -> dict[tuple[int, str], UnitSet]:
        sets = {}
        for index, layer in self._layers.items():
            target = targets[index]
            if target.heads_per_group:
                kind, size, drop = "head", layer.num_heads, target.heads_per_group * layer.num_kv_heads
            else:
                kind, size, drop = "kv_group", layer.num_kv_heads, target.kv_groups
            for kind_, size_, drop_ in ((kind, size, drop), ("channel", layer.intermediate_size, target.channels)):
                sets[(index, kind_)] = UnitSet(index, kind_, size_, drop_, torch.ones(size_, dtype=torch.bool))
        return sets

    def _round_drops(self, round_: int) -> dict[tuple[int, str], int]:
        """Units each set's sub-models drop this round: the round's share of the target."""
        drops = {}
        for key, unit_set in self._sets.items():
            removed = int((~unit_set.alive).sum())
            drops[key] = max(0, int(round(unit_set.drop * round_ / self.rounds)) - removed)
        return drops

    def _candidates(self, unit_set: UnitSet, drop: int) -> torch.Tensor:
        """Indices the sub-models may drop: the 2·drop alive units of lowest prior (all alive ones without one)."""
        alive = unit_set.alive.nonzero().squeeze(1)
        if drop == 0:
            return alive[:0]
        if self.prior is None or 2 * drop >= alive.numel():
            return alive
        order = torch.argsort(unit_set.prior[alive], stable=True)
        return alive[order[: 2 * drop]].sort().values

    def _set_keep(self, drop: Mapping[tuple[int, str], torch.Tensor]) -> None:
        """Masks of the sub-model that drops `drop` (and every unit removed by earlier rounds)."""
        self._keep.clear()
        for (index, kind), unit_set in self._sets.items():
            keep = unit_set.alive.clone()
            if (index, kind) in drop:
                keep[drop[(index, kind)]] = False
            if bool(keep.all()):
                continue
            layer = self._layers[index]
            if kind == "channel":
                self._keep[(index, "down_proj")] = keep.float()
            else:
                heads = keep.repeat_interleave(layer.n_rep) if kind == "kv_group" else keep
                self._keep[(index, "o_proj")] = heads.float().repeat_interleave(layer.head_dim)

    def _prior_scores(self, model: nn.Module, evaluation: list[dict]) -> float:
        """The loss of the model without the removed units, and the prior of every unit from that pass."""
        if self.prior is None:
            for unit_set in self._sets.values():
                unit_set.prior = torch.zeros(unit_set.size)
            return _mean_loss(model, evaluation)
        from .base import get_importance

        if self._prior_criterion is None:
            self._prior_criterion = get_importance(self.prior)
            self._prior_criterion.seed = self.seed
            self._prior_criterion.prepare(model, list(self._layers.values()))
        self._prior_criterion.enabled = True
        try:
            loss = _mean_loss(model, evaluation)
        finally:
            self._prior_criterion.enabled = False
        for index, layer in self._layers.items():
            scores = self._prior_criterion.score_layer(layer)
            if scores is None:
                raise RuntimeError(f"bonsai: prior={self.prior!r} has no scores for layer {index}")
            groups = group_scores({role: s.float().cpu() for role, s in scores.items()}, layer.n_rep)
            for (i, kind), unit_set in self._sets.items():
                if i == index:
                    unit_set.prior = {"channel": groups.channels, "head": groups.heads, "kv_group": groups.kv_groups}[kind]
        return loss

    # ---- regression -------------------------------------------------------------------------------------------

    def _fit(self, candidates, masks, losses: torch.Tensor, dense_loss: float) -> dict:
        """Ridge coefficients of every candidate (see the module docstring), by set."""
        keys = [k for k, c in candidates.items() if c.numel()]
        if not keys:
            return {"beta": {}, "scale": 1.0, "ridge": {}, "heldout_mse": float("nan")}
        rows = []
        for drop in masks:
            row = []
            for key in keys:
                keep = torch.ones(candidates[key].numel(), dtype=torch.float64)
                keep[torch.isin(candidates[key], drop[key])] = 0.0
                row.append(keep)
            rows.append(torch.cat(row))
        x = torch.stack(rows)
        y = -losses  # keeping an important unit lowers the loss: positive coefficient
        kind_names = sorted({self._sets[key].kind for key in keys})
        kind_of = torch.tensor([kind_names.index(self._sets[key].kind) for key in keys for _ in candidates[key]])
        prior = torch.cat([self._sets[key].prior[candidates[key]].double() for key in keys])
        scale = _prior_scale(x, losses, prior, dense_loss)
        beta0 = scale * prior
        if self.ridge is not None:
            ridge, heldout = (float(self.ridge),) * len(kind_names), float("nan")
        else:
            ridge, heldout = _cross_validate(x, y, beta0, kind_of, len(kind_names))
        beta = _ridge_fit(x, y, beta0, kind_of, len(kind_names), ridge)
        by_set, start = {}, 0
        for key in keys:  # X's columns: the candidates of each set, in this order
            by_set[key] = beta[start : start + candidates[key].numel()].float()
            start += candidates[key].numel()
        return {"beta": by_set, "scale": scale, "ridge": dict(zip(kind_names, ridge)), "heldout_mse": heldout}

    def _assign_scores(self, candidates, fit: dict) -> None:
        """Candidates score their coefficient; the other alive units their scaled prior, lifted above the
        layer's candidates (the paper keeps them with +inf; a finite score keeps normalisation and global
        ranking working); sets no sub-model perturbed score their scaled prior."""
        for key, unit_set in self._sets.items():
            scores = unit_set.prior.float() * fit["scale"]
            chosen = candidates[key]
            if chosen.numel():
                scores[chosen] = fit["beta"][key]
                others = unit_set.alive.clone()
                others[chosen] = False
                if bool(others.any()):
                    top = float(scores[chosen].max())
                    bottom = float(scores[others].min())
                    gap = 1e-6 * (abs(top) + 1e-12)
                    if bottom <= top:
                        scores[others] += top - bottom + gap
            if unit_set.scores is not None:
                dead = ~unit_set.alive
                scores[dead] = unit_set.scores[dead]  # keep what earlier rounds gave the removed units
            unit_set.scores = scores

    def _remove_lowest(self, drops) -> None:
        for key, unit_set in self._sets.items():
            if not drops[key]:
                continue
            alive = unit_set.alive.nonzero().squeeze(1)
            lowest = alive[torch.argsort(unit_set.scores[alive], stable=True)[: drops[key]]]
            unit_set.removed.append(lowest)
            unit_set.alive[lowest] = False

    def _final_scores(self, unit_set: UnitSet) -> torch.Tensor:
        """The last round's scores, with the units of each earlier round shifted below everything after it."""
        scores = unit_set.scores.clone()
        later = unit_set.alive.clone()
        for indices in reversed(unit_set.removed):
            floor = float(scores[later].min())
            top = float(scores[indices].max())
            if top >= floor:
                scores[indices] -= top - floor + 1e-6 * (abs(floor) + 1e-12)
            later[indices] = True
        return scores

    # ---- scores -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_layer(self, layer) -> Optional[ModuleScores]:
        found = [(key, s) for key, s in self._sets.items() if key[0] == layer.index]
        if not found or any(s.scores is None for _, s in found):
            return None
        out = zero_scores(layer)
        for (_, kind), unit_set in found:
            scores = self._final_scores(unit_set)
            if scores.numel() != unit_set.size:  # pragma: no cover - guarded by the layer's widths
                raise RuntimeError(f"layer {layer.index}: {kind} scores of width {scores.numel()}")
            if kind == "channel":
                out["down_proj"] = scores
            elif kind == "head":
                out["o_proj"] = scores
            else:  # a KV group's score, spread over its query heads so that group_scores sums it back
                out["o_proj"] = (scores / layer.n_rep).repeat_interleave(layer.n_rep)
        return out


# ---- pure helpers -------------------------------------------------------------------------------------------


def _first_sequences(batches: list[dict], limit: Optional[int]) -> list[dict]:
    """The first `limit` sequences of `batches`, in batches of the same size."""
    if limit is None:
        return batches
    out, left = [], limit
    for batch in batches:
        if left <= 0:
            break
        rows = min(left, batch["input_ids"].shape[0])
        out.append({k: v[:rows] for k, v in batch.items()})
        left -= rows
    return out


def _mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean loss per predicted token over `batches` (each batch's loss weighted by its label tokens)."""
    total, tokens = 0.0, 0
    for batch in batches:
        count = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * count
        tokens += count
    return total / max(tokens, 1)


def _complementable(candidates: torch.Tensor, drop: int) -> bool:
    return candidates.numel() == 2 * drop


def _draw(unit_set: UnitSet, candidates: torch.Tensor, drop: int, generator: torch.Generator) -> torch.Tensor:
    """`drop` candidates without replacement, likelier the lower their prior (uniform without one)."""
    prior = unit_set.prior[candidates].double()
    weights = prior.max() - prior
    weights = weights + 1e-3 * (weights.mean() if float(weights.mean()) > 0 else 1.0)
    chosen = torch.multinomial(weights, drop, replacement=False, generator=generator)
    return candidates[chosen].sort().values


def _prior_scale(x, losses, prior, dense_loss: float) -> float:
    """Loss units per unit of prior: the prior of the units a sub-model drops accounts, on average, for its
    loss increase over the unmasked model (0 without a prior)."""
    dropped_prior = float(((1.0 - x) @ prior).mean())
    if dropped_prior <= 0:
        return 0.0
    return max(float(losses.mean()) - dense_loss, 0.0) / dropped_prior


def _ridge_fit(x, y, beta0, kind_of, kinds: int, ridge):
    """β = β₀ + D·Xᵀ(X·D·Xᵀ + I)⁻¹(y − Xβ₀) on centred data: ridge towards β₀ with the penalty 1/D on the
    units of kind k `ridge[k]` times the mean diagonal of X_k·X_kᵀ (so each kind's scale does not matter)."""
    xc = x - x.mean(dim=0)
    residual = (y - y.mean()) - xc @ beta0
    inverse_penalty = torch.empty(x.shape[1], dtype=x.dtype)
    for k in range(kinds):
        mean_diagonal = float(xc[:, kind_of == k].pow(2).sum(dim=1).mean().clamp(min=1e-12))
        inverse_penalty[kind_of == k] = 1.0 / (ridge[k] * mean_diagonal)
    weighted = xc * inverse_penalty
    kernel = weighted @ xc.T + torch.eye(x.shape[0], dtype=x.dtype)
    return beta0 + weighted.T @ torch.linalg.solve(kernel, residual)


def _cross_validate(x, y, beta0, kind_of, kinds: int) -> tuple[tuple[float, ...], float]:
    """The ridge per kind (from RIDGE_GRID) with the lowest held-out squared error over FOLDS folds (pairs stay
    together): kinds whose coefficients the data cannot resolve get a large ridge and stay near the prior."""
    n = x.shape[0]
    fold_of = (torch.arange(n) // 2) % FOLDS
    if n < 2 * FOLDS:
        return (1.0,) * kinds, float("nan")
    best = (float("inf"), (1.0,) * kinds)
    for ridge in itertools.product(RIDGE_GRID, repeat=kinds):
        error = 0.0
        for fold in range(FOLDS):
            test = fold_of == fold
            train = ~test
            beta = _ridge_fit(x[train], y[train], beta0, kind_of, kinds, ridge)
            intercept = y[train].mean() - x[train].mean(dim=0) @ beta
            error += float(((x[test] @ beta + intercept - y[test]) ** 2).sum())
        error /= n
        if error < best[0]:
            best = (error, ridge)
    return best[1], best[0]
