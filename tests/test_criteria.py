"""Importance criteria: each finds a group built to be unimportant, and the LoRA
estimate tracks the true Taylor score."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hfprune import PruningConfig, get_importance, register_importance
from hfprune.allocation import allocate
from hfprune.importance import ImportanceCriterion, ScoreAccumulator
from hfprune.importance import score_model
from hfprune.prune import _score_with_gradients
from hfprune.structure import discover

from .tiny_models import (
    DEAD_CHANNELS, DEAD_GROUP, DEAD_LAYER, LORA_TARGETS, batch, model_with_dead_groups, tiny_model, with_lora,
)

def _model_with_dead_groups(lora: bool):
    model = model_with_dead_groups()
    return with_lora(model, b_std=1e-4) if lora else model  # B small next to W


def _scores(model, importance, batches=None):
    structure = discover(model, protected_layers=())
    criterion = get_importance(importance)
    accumulator = ScoreAccumulator(normalize=False, signed=getattr(criterion, "signed", False))
    if batches is None:
        score_model(structure, criterion, accumulator)
    else:
        _score_with_gradients(model, structure, criterion, accumulator, batches)
    return structure, accumulator


@pytest.mark.parametrize("importance", ["lora", "taylor", "taylor2", "vector", "magnitude"])
def test_criterion_ranks_the_dead_group_and_channels_lowest(importance):
    model = _model_with_dead_groups(lora=importance == "lora")
    batches = [{"input_ids": batch(seed=s)} for s in range(3)] if importance != "magnitude" else None
    structure, accumulator = _scores(model, importance, batches)
    scores = accumulator.group_scores(DEAD_LAYER, structure.layers[DEAD_LAYER].n_rep)
    assert int(scores.kv_groups.argmin()) == DEAD_GROUP
    lowest = set(torch.argsort(scores.channels)[: len(DEAD_CHANNELS)].tolist())
    assert lowest == set(DEAD_CHANNELS)
    # and the allocation removes exactly them
    config = PruningConfig(head_sparsity=0.5, channel_sparsity=3 / 96, protected_layers=(), head_granularity="kv_group")
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    assert masks[DEAD_LAYER].kv_groups(2).tolist() == [True, False]
    assert set((~masks[DEAD_LAYER].channels).nonzero().squeeze(1).tolist()) == set(DEAD_CHANNELS)


def test_random_criterion_is_seeded():
    model = tiny_model("llama")
    a = _scores(model, "random")[1].scores
    b = _scores(model, "random")[1].scores
    assert all(torch.equal(a[i][r], b[i][r]) for i in a for r in a[i])


def test_user_registered_criterion():
    @register_importance("unit_test_negative_magnitude", overwrite=True)
    class NegativeMagnitude(ImportanceCriterion):
        def element_importance(self, module, rows):
            from hfprune.importance.weights import dense_weight

            return -dense_weight(module, rows).abs()

    structure, accumulator = _scores(tiny_model("llama"), "unit_test_negative_magnitude")
    assert accumulator.group_scores(1, 4).channels.max() <= 0


def test_non_finite_step_does_not_poison_the_average():
    accumulator = ScoreAccumulator(decay=0.9, normalize=False)
    good = {0: {"q_proj": torch.tensor([1.0, 2.0])}}
    assert accumulator.update(good)
    assert not accumulator.update({0: {"q_proj": torch.tensor([float("nan"), 1.0])}})
    assert accumulator.num_skipped == 1
    torch.testing.assert_close(accumulator.scores[0]["q_proj"], torch.tensor([1.0, 2.0]))
    accumulator.update({0: {"q_proj": torch.tensor([2.0, 2.0])}})
    torch.testing.assert_close(accumulator.scores[0]["q_proj"], torch.tensor([1.1, 2.0]))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _lora_vs_taylor_rho(train_steps: int) -> tuple[float, float]:
    """Spearman's rho of LoRA-estimated vs true Taylor channel scores on the same batch,
    after `train_steps` LoRA steps (B == 0 when 0), and of random scores vs Taylor."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_hidden_layers=2, intermediate_size=256),
                           LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(train_steps):
        ids = batch(batch_size=4, seq_len=32, seed=100 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    structure = discover(model, protected_layers=())
    for layer in structure:  # one backward gives both the LoRA gradients and the full weight gradients
        for role in LORA_TARGETS:
            layer.projection(role).base_layer.weight.requires_grad_(True)
    ids = batch(batch_size=8, seq_len=32, seed=7)
    model(input_ids=ids, labels=ids).loss.backward()
    lora, taylor, rand = (ScoreAccumulator(normalize=False) for _ in range(3))
    score_model(structure, get_importance("lora"), lora)
    score_model(structure, get_importance("taylor"), taylor)
    score_model(structure, get_importance("random"), rand)
    rho_lora = [_spearman(lora.group_scores(i, 4).channels, taylor.group_scores(i, 4).channels) for i in (0, 1)]
    rho_rand = [_spearman(rand.group_scores(i, 4).channels, taylor.group_scores(i, 4).channels) for i in (0, 1)]
    return sum(rho_lora) / 2, sum(rho_rand) / 2


def test_lora_estimate_correlates_with_true_taylor_scores():
    rho_trained, rho_random = _lora_vs_taylor_rho(train_steps=30)
    rho_first_step, _ = _lora_vs_taylor_rho(train_steps=0)
    print(f"Spearman rho vs taylor: lora after 30 steps {rho_trained:.3f}, lora at B=0 {rho_first_step:.3f}, "
          f"random {rho_random:.3f}")
    assert rho_trained > 0.5
    assert rho_trained > rho_random + 0.4


def test_prune_model_keeps_activation_checkpointing_and_no_dropout():
    """transformers checkpoints only in training mode: scoring a checkpointed model runs in training mode
    (activations recomputed, the memory saving users asked for) with every dropout off (scores are exact)."""
    from hfprune import prune_model

    calls = []
    kept = []
    for checkpointing in (False, True, True):
        model = tiny_model("llama", attention_dropout=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer in model.model.layers:  # count the recomputed layers
                real = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, real=real, **k: calls.append(1) or real(*a, **k)
        model.eval()
        config = PruningConfig(target_sparsity=0.4, importance="taylor", protected_layers=(0,), compensation="none",
                               head_granularity="kv_group")
        prune_model(model, config, calibration_data=[{"input_ids": batch(seed=s)} for s in range(2)])
        assert not model.training  # the caller's mode is restored
        kept.append([layer.self_attn.o_proj.weight.clone() for layer in model.model.layers])
        assert bool(calls) == checkpointing
        calls.clear()
    for a, b, c in zip(*kept):
        assert torch.equal(a, b) and torch.equal(b, c)  # dropout off: the same scores, the same groups kept


def test_a_registered_criterion_must_declare_a_known_need():
    from hfprune.importance import base

    try:
        @register_importance("unit_test_bad_needs", overwrite=True)
        class BadNeeds(ImportanceCriterion):
            needs = "gradients_please"

        with pytest.raises(ValueError, match="needs='gradients_please' must be one of nothing, forward"):
            get_importance("unit_test_bad_needs")

        register_importance("unit_test_not_a_criterion", lambda: object(), overwrite=True)
        with pytest.raises(TypeError, match="returned object, not an hfprune.importance.ImportanceCriterion"):
            get_importance("unit_test_not_a_criterion")
    finally:  # broken criteria must not outlive the test: the estimator walks the registry
        base._REGISTRY.pop("unit_test_bad_needs", None)
        base._REGISTRY.pop("unit_test_not_a_criterion", None)


def test_every_built_in_criterion_declares_what_the_estimator_and_trainer_read():
    from hfprune.importance import NEEDS, available_importances

    for name in available_importances():
        if name.startswith("unit_test"):
            continue
        criterion = get_importance(name)
        assert criterion.needs in NEEDS
        assert criterion.needs_weight_gradients == (name in ("taylor", "taylor2", "param_second", "vector"))
        assert criterion.work_buffers >= 0 and criterion.weight_state_buffers >= 0
        criterion.release()  # a criterion that was never prepared releases nothing, without error


def test_the_built_in_names_are_exactly_what_the_criterion_modules_register():
    """names.BUILTIN_CRITERIA (torch-free, read by `hfprune estimate --help`) is the registry's list of built-in
    modules: a criterion module added without its entry there would never be registered."""
    import re
    from pathlib import Path

    import hfprune.importance as package
    from hfprune.importance.names import BUILTIN_CRITERIA

    declared = {}
    for path in Path(package.__file__).parent.glob("*.py"):
        for name in re.findall(r'^@register_importance\("([^"]+)"', path.read_text(), flags=re.M):
            declared[name] = path.stem
    assert declared == BUILTIN_CRITERIA
    assert set(BUILTIN_CRITERIA) <= set(package.available_importances())
