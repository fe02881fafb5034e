"""Bonsai: sub-models sampled at the target, their losses regressed on the masks; forward passes only."""

from __future__ import annotations

import pytest
import torch

from hfprune import PruningCallback, PruningConfig, PruningTrainer, prune_model
from hfprune.allocation import removal_targets
from hfprune.importance import RemovalTarget, ScoreAccumulator, get_importance
from hfprune.importance.bonsai import _ridge_fit
from hfprune.prune import _score_with_sampled_losses
from hfprune.removal import attached
from hfprune.structure import discover

from .tiny_models import DEAD_CHANNELS, DEAD_GROUP, DEAD_LAYER, batch, model_with_dead_groups, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# 1 of 2 KV groups and a quarter of the channels of every layer: the dead ones must be among them.
CONFIG = dict(head_sparsity=0.5, channel_sparsity=0.25, protected_layers=(), importance="bonsai", head_granularity="kv_group")


def _calibration(n: int = 2):
    return [{"input_ids": batch(batch_size=4, seq_len=32, seed=s)} for s in range(n)]


def _scores(model, config=None, **kwargs):
    config = config or PruningConfig(**CONFIG)
    structure = discover(model, protected_layers=config.protected_layers)
    criterion = get_importance("bonsai", **{"samples": 24, "sequences": None, **kwargs})
    criterion.seed = config.seed
    accumulator = ScoreAccumulator(normalize=False)
    _score_with_sampled_losses(model, structure, config, criterion, accumulator, _calibration())
    criterion.release()
    return structure, accumulator, criterion


@pytest.mark.parametrize("rounds", [1, 2])
def test_bonsai_ranks_the_dead_group_and_channels_lowest(rounds):
    """With a large ridge the scores stay near the prior where the samples cannot resolve single units: the
    dead groups score lowest. (Measured effects alone would not rank them lowest on a random model: removing
    about half of its live channels *lowers* the loss on random tokens; see the oracle test below.)"""
    structure, accumulator, criterion = _scores(model_with_dead_groups(), rounds=rounds, ridge=100.0, samples=16)
    scores = accumulator.group_scores(DEAD_LAYER, structure.layers[DEAD_LAYER].n_rep)
    assert int(scores.kv_groups.argmin()) == DEAD_GROUP
    assert set(torch.argsort(scores.channels)[: len(DEAD_CHANNELS)].tolist()) == set(DEAD_CHANNELS)
    raw = accumulator.scores[DEAD_LAYER]  # only o_proj / down_proj carry scores, as the activation criteria
    assert all(float(raw[role].abs().sum()) == 0.0 for role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert len(criterion.history) == rounds and all(r["seconds"] >= 0 for r in criterion.history)
    # sub-models at the target lose something on average
    assert all(r["mean_sampled_loss"] > r["dense_loss"] for r in criterion.history)


def test_bonsai_tracks_the_loss_change_of_removing_each_channel():
    """The regression measures what removal costs: with one prunable layer and no prior, the channel scores
    rank like the loss increase of removing each channel alone (Spearman 0.78-0.82 over seeds)."""
    from scipy.stats import spearmanr

    from hfprune.importance.bonsai import _mean_loss

    model = model_with_dead_groups()
    config = PruningConfig(**{**CONFIG, "protected_layers": (0, 1, 3)})
    structure, accumulator, _ = _scores(model, config, prior=None, samples=128)
    calibration = [{**b, "labels": b["input_ids"]} for b in _calibration()]
    down_proj = model.model.layers[DEAD_LAYER].mlp.down_proj
    with torch.no_grad():
        dense = _mean_loss(model, calibration)
        increase = []
        for channel in range(down_proj.in_features):
            keep = torch.ones(down_proj.in_features)
            keep[channel] = 0.0
            handle = down_proj.register_forward_pre_hook(lambda module, args: (args[0] * keep,))
            increase.append(_mean_loss(model, calibration) - dense)
            handle.remove()
    scores = accumulator.group_scores(DEAD_LAYER, 4).channels
    assert spearmanr(scores, increase).correlation > 0.6


def test_prune_model_with_bonsai_removes_the_dead_groups_and_leaves_no_hook(monkeypatch):
    from hfprune import register_importance
    from hfprune.importance import base
    from hfprune.importance.bonsai import BonsaiImportance

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the variant is this test's alone
    register_importance("unit_test_bonsai_near_prior", lambda: BonsaiImportance(samples=16, ridge=100.0), overwrite=True)
    model = model_with_dead_groups()
    config = PruningConfig(**{**CONFIG, "importance": "unit_test_bonsai_near_prior"})
    with torch.no_grad():
        prune_model(model, config, calibration_data=_calibration())
    masks = attached(model).masks[DEAD_LAYER]
    assert masks.kv_groups(2).tolist() == [i != DEAD_GROUP for i in range(2)]
    assert set(DEAD_CHANNELS) <= set((~masks.channels).nonzero().squeeze(1).tolist())
    layer = model.model.layers[DEAD_LAYER]
    assert not layer.mlp.down_proj._forward_pre_hooks and not layer.self_attn.o_proj._forward_pre_hooks
    assert not layer.mlp.down_proj._forward_hooks  # the prior's hooks are gone too
    assert layer.mlp.down_proj.in_features == 96 - 24


def test_query_head_granularity_samples_query_heads():
    config = PruningConfig(**{**CONFIG, "head_granularity": "query_head"})
    structure, accumulator, _ = _scores(model_with_dead_groups(), config, ridge=100.0, samples=16)
    assert removal_targets(structure, config)[DEAD_LAYER] == RemovalTarget(heads_per_group=2, channels=24)
    scores = accumulator.group_scores(DEAD_LAYER, 4)
    assert set(torch.argsort(scores.heads)[:4].tolist()) == set(range(DEAD_GROUP * 4, DEAD_GROUP * 4 + 4))


def test_bonsai_is_deterministic_given_the_seed():
    model = tiny_model("llama")
    a = _scores(model)[1].scores
    b = _scores(model)[1].scores
    c = _scores(model, PruningConfig(**CONFIG, seed=1))[1].scores
    assert all(torch.equal(a[i][r], b[i][r]) for i in a for r in a[i])
    assert not all(torch.equal(a[i]["down_proj"], c[i]["down_proj"]) for i in a)


def test_without_a_prior_every_unit_is_a_candidate():
    structure, accumulator, criterion = _scores(model_with_dead_groups(), prior=None, samples=16)
    assert criterion.history[0]["prior_scale"] == 0.0
    scores = accumulator.group_scores(DEAD_LAYER, structure.layers[DEAD_LAYER].n_rep)
    assert bool(torch.isfinite(scores.channels).all()) and float(scores.channels.abs().sum()) > 0


def test_ridge_regression_recovers_unit_effects():
    """Synthetic losses from known per-unit effects: the fit finds them; centred on the truth with a large
    ridge it stays there; cross-validation picks a small ridge when the data resolves the units."""
    from hfprune.importance.bonsai import RIDGE_GRID, _cross_validate, _prior_scale

    generator = torch.Generator().manual_seed(0)
    units, samples = 40, 200
    effects = torch.rand(units, generator=generator, dtype=torch.float64)
    keep = (torch.rand(samples, units, generator=generator) > 0.5).double()
    losses = 3.0 - keep @ effects + 0.01 * torch.randn(samples, generator=generator, dtype=torch.float64)
    kinds = torch.zeros(units, dtype=torch.long)
    zero = torch.zeros(units, dtype=torch.float64)
    beta = _ridge_fit(keep, -losses, zero, kinds, 1, (1e-3,))
    assert torch.corrcoef(torch.stack([beta, effects]))[0, 1] > 0.99
    ridge, heldout = _cross_validate(keep, -losses, zero, kinds, 1)
    assert ridge == (RIDGE_GRID[0],) and heldout < 1e-3
    torch.testing.assert_close(_ridge_fit(keep, -losses, effects, kinds, 1, (1e6,)), effects, atol=1e-3, rtol=0)
    # the prior's scale: the dropped units' prior explains the mean loss increase over the full model
    dense = 3.0 - float(effects.sum())
    scale = _prior_scale(keep, losses, 10.0 * effects, dense)
    assert scale == pytest.approx(0.1, rel=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"samples": 1}, r"samples=1: must be an integer >= 2"),
        ({"samples": 8.0}, r"samples=8.0: must be an integer >= 2"),
        ({"rounds": 0}, r"rounds=0: must be an integer >= 1"),
        ({"sequences": 0}, r"sequences=0: must be an integer >= 1 or None"),
        ({"ridge": 0.0}, r"ridge=0.0: must be a finite number > 0, or None"),
        ({"ridge": float("nan")}, r"ridge=nan: must be a finite number > 0"),
        ({"prior": "wanda"}, r"prior='wanda': unknown criterion; available: .*activation"),
        ({"prior": "taylor"}, r"prior='taylor' needs 'weight_gradients': a prior must score from weights or forward"),
        ({"prior": "bonsai"}, r"prior='bonsai' needs 'forward_loss'"),
    ],
)
def test_bad_arguments_name_the_value_and_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_importance("bonsai", **kwargs)


def test_training_refuses_bonsai_before_any_work():
    config = PruningConfig(importance="bonsai")
    with pytest.raises(ValueError, match=r"importance='bonsai' scores with forward passes of its own.*prune_model"):
        PruningCallback(config)
    with pytest.raises(ValueError, match=r"importance='bonsai' scores with forward passes of its own"):
        PruningTrainer(model="/nonexistent/model", pruning_config=config)  # refused before loading


def test_prune_model_without_calibration_data_names_what_bonsai_needs():
    with pytest.raises(ValueError, match=r"importance='bonsai' needs forward passes with labels: pass calibration"):
        prune_model(tiny_model("llama"), PruningConfig(**CONFIG))


def test_bonsai_with_compensation_compensates_the_unmasked_model():
    """The compensator's statistics come from a plain pass over the calibration data (never from the sampled
    sub-models): its map equals one computed from plain passes for the same masks."""
    from hfprune.compensator import make_compensator
    from hfprune.masking import PruningMasks
    from hfprune.prune import _forward_passes

    config = PruningConfig(**CONFIG, compensation="least_squares")
    model = model_with_dead_groups()
    prune_model(model, config, calibration_data=iter(_calibration()))  # an iterator: read twice, listed once
    record = attached(model)
    reference = model_with_dead_groups()
    structure = discover(reference, protected_layers=())
    compensator = make_compensator(config)
    compensator.prepare(reference, structure.prunable_layers)
    _forward_passes(reference, _calibration())
    compensator.apply(structure, PruningMasks.full(structure), record.masks)
    compensator.release()
    for key in ((DEAD_LAYER, "down_proj"), (DEAD_LAYER, "o_proj")):
        got, want = record.compensation.get(*key), compensator.record.get(*key)
        assert torch.equal(got.kept, want.kept) and torch.equal(got.removed, want.removed)
        torch.testing.assert_close(got.matrix, want.matrix, rtol=1e-4, atol=1e-6)


def test_bonsai_prunes_an_8bit_base(tmp_path):
    """Forward passes only: an int8 (bitsandbytes Linear8bitLt) base is scored and sliced like a float one."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .tiny_models import save_tiny

    save_tiny("llama", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32,
    ).eval()
    prune_model(model, PruningConfig(**{**CONFIG, "protected_layers": (0,)}), calibration_data=_calibration(1))
    layer = model.model.layers[1]
    assert type(layer.mlp.down_proj).__name__ == "Linear8bitLt" and layer.mlp.down_proj.in_features == 72
    assert layer.self_attn.o_proj.in_features == 32  # one of two KV groups (4 query heads of 8 dims) left
    assert not any(p.requires_grad for p in model.parameters() if p.dtype == torch.int8)


def test_a_target_that_removes_nothing_samples_nothing():
    structure, accumulator, criterion = _scores(tiny_model("llama"), PruningConfig(**{**CONFIG, "head_sparsity": 0.0,
                                                                                       "channel_sparsity": 0.0}))
    assert criterion.history[0]["mean_sampled_loss"] == criterion.history[0]["dense_loss"]
    assert all(torch.isfinite(s).all() for scores in accumulator.scores.values() for s in scores.values())
