"""Activation-based criteria: `activation_taylor(_sq)` (Molchanov's feature-map Taylor, from activation
gradients only) and the gradient-free `activation` (Wanda) and `flap` (FLAP)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from hfprune import PruningConfig
from hfprune.importance import ScoreAccumulator, get_importance
from hfprune.masking import MaskHooks, PruningMasks
from hfprune.importance import score_model
from hfprune.prune import prune_model
from hfprune.structure import discover

from .tiny_models import (
    DEAD_CHANNELS, DEAD_GROUP, DEAD_LAYER, LORA_TARGETS, batch, model_with_dead_groups, tiny_model, with_lora,
)

ACTIVATION_CRITERIA = ["activation_taylor", "activation_taylor_sq", "activation", "flap"]
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(model):
    return with_lora(model, b_std=1e-3)


def _model_with_dead_groups(lora: bool = True):
    model = model_with_dead_groups()
    return _lora(model) if lora else model


def _forward_backward(model, batches, grad=True):
    for ids in batches:
        if grad:
            model(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)


def _scores(model, name, batches, layers=None):
    """Raw scores (no normalisation) of every layer, from forward (+ backward) passes over `batches`."""
    structure = discover(model, protected_layers=())
    criterion = get_importance(name)
    criterion.prepare(model, structure.layers if layers is None else layers)
    _forward_backward(model, batches, grad=criterion.needs != "forward")
    accumulator = ScoreAccumulator(normalize=False)
    assert score_model(structure, criterion, accumulator)
    criterion.release()
    return structure, accumulator, criterion


@pytest.mark.parametrize("name", ACTIVATION_CRITERIA)
def test_criterion_ranks_the_dead_group_and_channels_lowest(name):
    model = _model_with_dead_groups()
    structure, accumulator, _ = _scores(model, name, [batch(seed=s) for s in range(3)])
    scores = accumulator.group_scores(DEAD_LAYER, structure.layers[DEAD_LAYER].n_rep)
    assert int(scores.kv_groups.argmin()) == DEAD_GROUP
    assert set(torch.argsort(scores.heads)[:4].tolist()) == set(range(DEAD_GROUP * 4, DEAD_GROUP * 4 + 4))
    assert set(torch.argsort(scores.channels)[: len(DEAD_CHANNELS)].tolist()) == set(DEAD_CHANNELS)
    # only o_proj / down_proj carry scores
    raw = accumulator.scores[DEAD_LAYER]
    assert all(float(raw[role].abs().sum()) == 0.0 for role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))


def _reference_activation_taylor(model, layer_index, batches):
    """z and dL/dz of layer `layer_index`'s o_proj / down_proj inputs, captured with retain_grad."""
    layer = discover(model, protected_layers=()).layers[layer_index]
    captured = {"o_proj": [], "down_proj": []}

    def capture(role):
        def hook(module, args):
            args[0].retain_grad()
            captured[role].append(args[0])

        return hook

    handles = [layer.projection(role).register_forward_pre_hook(capture(role)) for role in captured]
    _forward_backward(model, batches)
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    out = {}
    for role, width in (("o_proj", layer.head_dim), ("down_proj", 1)):
        s = torch.cat([(z * z.grad).detach() for z in captured[role]])  # [sequences, tokens, features]
        s = s.view(*s.shape[:2], -1, width).sum(dim=3)  # s_t per unit
        out[role] = (s.mean(dim=1).abs().mean(dim=0), s.pow(2).mean(dim=(0, 1)))
    return out


def test_activation_taylor_is_the_first_order_activation_saliency():
    model = _lora(tiny_model("llama"))
    batches = [batch(seed=s) for s in range(2)]
    reference = _reference_activation_taylor(model, 1, batches)
    for name, which in (("activation_taylor", 0), ("activation_taylor_sq", 1)):
        _, accumulator, _ = _scores(model, name, batches)
        for role in ("o_proj", "down_proj"):
            torch.testing.assert_close(accumulator.scores[1][role], reference[role][which], rtol=1e-4, atol=1e-12)
    # no weight gradient is needed: only the LoRA factors ever require grad
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_taylor_under_gradient_checkpointing(reentrant):
    ids = [batch(seed=3)]
    plain = _scores(_lora(tiny_model("llama")), "activation_taylor", ids)[1]
    model = _lora(tiny_model("llama"))
    model.train()  # transformers only checkpoints in training mode (dropout is 0 here)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    checkpointed = _scores(model, "activation_taylor", ids)[1]
    for index in plain.scores:
        for role in ("o_proj", "down_proj"):
            torch.testing.assert_close(checkpointed.scores[index][role], plain.scores[index][role], rtol=1e-4,
                                       atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATION_CRITERIA)
def test_prepare_is_idempotent_and_scoring_resets(name):
    model = _lora(tiny_model("llama"))
    structure = discover(model, protected_layers=())
    criterion = get_importance(name)
    criterion.prepare(model, structure.layers)
    criterion.prepare(model, structure.layers)  # no second set of hooks
    module = structure.layers[1].projection("down_proj")
    assert len(module._forward_pre_hooks) + len(module._forward_hooks) == 1
    ids = [batch(seed=4)]
    _forward_backward(model, ids, grad=criterion.needs != "forward")
    first = criterion.score_layer(structure.layers[1])
    assert criterion.score_layer(structure.layers[1]) is None  # reset: nothing since the last scoring
    _forward_backward(model, ids, grad=criterion.needs != "forward")
    second = criterion.score_layer(structure.layers[1])
    torch.testing.assert_close(second["down_proj"], first["down_proj"])
    # evaluation passes (no grad) leave activation_taylor untouched
    if criterion.needs != "forward":
        _forward_backward(model, ids, grad=False)
        assert criterion.score_layer(structure.layers[1]) is None
    criterion.release()
    assert len(module._forward_pre_hooks) + len(module._forward_hooks) == 0


def test_gradient_free_criteria_match_hand_computation():
    model = _lora(tiny_model("llama"))
    layer = discover(model, protected_layers=()).layers[2]
    inputs = {"o_proj": [], "down_proj": []}
    handles = [layer.projection(role).register_forward_pre_hook(
        lambda m, a, role=role: inputs[role].append(a[0].reshape(-1, a[0].shape[-1]).clone())) for role in inputs]
    batches = [batch(seed=s) for s in range(3)]
    _forward_backward(model, batches, grad=False)
    for handle in handles:
        handle.remove()
    scores = {name: _scores(model, name, batches)[1].scores[2] for name in ("activation", "flap")}
    for role, width in (("o_proj", layer.head_dim), ("down_proj", 1)):
        x = torch.cat(inputs[role]).double()
        module = layer.projection(role)
        weight = (module.base_layer.weight + module.scaling["default"] * module.lora_B["default"].weight
                  @ module.lora_A["default"].weight).detach().double()
        wanda = weight.abs().sum(0) * x.pow(2).mean(0).sqrt()
        flap = weight.pow(2).sum(0) * x.var(0, unbiased=False)
        torch.testing.assert_close(scores["activation"][role].double(), wanda.view(-1, width).sum(1), rtol=1e-4, atol=0)
        torch.testing.assert_close(scores["flap"][role].double(), flap.view(-1, width).sum(1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["activation", "flap"])
def test_gradient_free_criteria_run_under_no_grad_without_any_gradient(name):
    model = tiny_model("llama")
    structure, accumulator, criterion = _scores(model, name, [batch(seed=1)])
    assert criterion.needs == "forward"
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(accumulator.scores[i]["down_proj"]).all() for i in range(4))


def test_masked_groups_score_zero_as_in_the_callback():
    # The callback prepares the criterion, then installs the mask hooks.
    model = _lora(tiny_model("llama"))
    structure = discover(model, protected_layers=())
    criteria = {name: get_importance(name) for name in ACTIVATION_CRITERIA}
    for criterion in criteria.values():
        criterion.prepare(model, structure.layers)
    masks = PruningMasks.full(structure)
    masks[1].heads[:4] = False
    masks[1].channels[:10] = False
    hooks = MaskHooks(structure, masks)
    _forward_backward(model, [batch(seed=2)])
    for name, criterion in criteria.items():
        scores = criterion.score_layer(structure.layers[1])
        assert float(scores["o_proj"][:4].abs().sum()) == 0.0 and bool((scores["o_proj"][4:] > 0).all()), name
        assert float(scores["down_proj"][:10].abs().sum()) == 0.0, name
        criterion.release()
    hooks.remove()


def test_prune_model_with_activation_taylor_on_a_frozen_base():
    model = _lora(tiny_model("llama"))
    config = PruningConfig(target_sparsity=0.3, importance="activation_taylor", protected_layers=(0,))
    before = sum(p.numel() for p in model.parameters())
    prune_model(model, config, calibration_data=[{"input_ids": batch(seed=s)} for s in range(2)])
    assert sum(p.numel() for p in model.parameters()) < before
    assert all(p.grad is None for p in model.parameters())
    module = discover(model).layers[1].projection("o_proj")
    assert len(module._forward_pre_hooks) == 0  # the criterion's hooks did not outlive prune_model
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=batch()).logits).all()


def test_prune_model_with_activation_taylor_computes_no_weight_gradient():
    """On a plain fp32 model (every weight trainable) only activation gradients are computed."""
    from hfprune import prune as prune_module

    model = tiny_model("llama")
    assert all(p.requires_grad for p in model.parameters())
    seen = []
    real_score_model = prune_module.score_model

    def spy(structure, criterion, accumulator):
        seen.extend(name for name, p in model.named_parameters() if p.grad is not None)
        return real_score_model(structure, criterion, accumulator)

    config = PruningConfig(target_sparsity=0.3, importance="activation_taylor", protected_layers=(0,))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prune_module, "score_model", spy)
        prune_model(model, config, calibration_data=[{"input_ids": batch(seed=s)} for s in range(2)])
    assert seen == []
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert len(model.get_input_embeddings()._forward_hooks) == 0


@pytest.mark.parametrize("name", ["activation", "flap"])
def test_prune_model_gradient_free_under_no_grad(name):
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    config = PruningConfig(target_sparsity=0.3, importance=name, protected_layers=(0,))
    with torch.no_grad():  # forward passes only: no backward is ever called
        prune_model(model, config, calibration_data=[{"input_ids": batch(seed=s)} for s in range(2)])
    assert sum(p.numel() for p in model.parameters()) < before
    assert all(p.grad is None for p in model.parameters())


def test_activation_taylor_ranks_like_the_removal_oracle():
    """Spearman's rho between the scores and the loss increase of removing each group alone, on a fixed
    batch (benchmarks/oracle_ranking.py on a small trained model: 2 layers, 8 heads, 48 channels each)."""
    spec = importlib.util.spec_from_file_location("oracle_ranking", ROOT / "benchmarks" / "oracle_ranking.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    setting = bench.tiny_setting(pretrain_steps=60, lora_steps=10, layers=(1, 2), channel_sample=48, eval_count=2,
                                 calibration_count=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                 intermediate_size=128)
    results = bench.run(setting, criteria=("activation_taylor", "random"), sources=("in_sample",))["in_sample"]
    ours, chance = results["activation_taylor"], results["random"]
    print({k: round(v, 3) for k, v in ours.items()}, {k: round(v, 3) for k, v in chance.items()})
    assert ours["head_pooled"] > 0.5 and ours["head_pooled"] > chance["head_pooled"] + 0.3
    # single channels barely move the loss, and some lower it (a score >= 0 cannot say so): a weaker bar
    assert ours["channel_pooled"] > chance["channel_pooled"] + 0.1
    pooled = ("kv_pooled", "head_pooled", "channel_pooled")
    assert sum(ours[k] for k in pooled) > sum(chance[k] for k in pooled) + 0.5


@pytest.mark.parametrize("name", ["activation_taylor", "flap"])
def test_callback_prunes_an_8bit_base_with_activation_criteria(tmp_path, name):
    """Inside the stock Trainer loop: frozen int8 base + LoRA, scored every step, masks, then slicing."""
    import datasets
    from transformers import TrainingArguments

    from hfprune import PruningTrainer

    from .tiny_models import alpaca_records, save_tiny, tiny_tokenizer

    save_tiny("llama", tmp_path / "base")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0)
    trainer = PruningTrainer(
        model=str(tmp_path / "base"), args=args, load_in_8bit=True,
        pruning_config=PruningConfig(target_sparsity=0.3, importance=name, prune_every=1, protected_layers=(0,)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0),
        train_dataset=datasets.Dataset.from_list(alpaca_records(16)), processing_class=tiny_tokenizer(),
    )
    assert type(trainer.model.base_model.model.model.layers[1].self_attn.o_proj.base_layer).__name__ == "Linear8bitLt"
    trainer.train()
    callback = trainer.pruning_callback
    assert callback.physically_pruned and callback.accumulator.num_updates > 0
    assert 0.2 < callback.sparsity().sparsity < 0.4
    assert all(torch.isfinite(s).all() for scores in callback.accumulator.scores.values() for s in scores.values())
    assert all(p.grad is None or "lora_" in n for n, p in trainer.model.named_parameters())
