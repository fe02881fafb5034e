"""Compensation inside the engine: one shot (prune_model), progressive (PruningCallback), the record the
export replays, and bad input."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import TrainingArguments

from hfprune import PruningConfig, PruningTrainer, prune_model
from hfprune.compensator import ColumnMap, CompensationRecord, kept_features
from hfprune.masking import PruningMasks
from hfprune.removal import attached
from hfprune.structure import base_layer, discover

from .tiny_models import LORA_TARGETS, alpaca_records, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(seed: int, count: int = 6, batch: int = 4, seq: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=generator)} for _ in range(count)]


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in batches])


@pytest.mark.parametrize("structures, at_most", [(("channels",), 0.95), (("heads", "channels"), 0.9)])
def test_one_shot_compensation_brings_the_pruned_model_closer_to_the_dense_one(structures, at_most):
    # An MLP four times wider than the hidden size: its channels are redundant, as in a real model.
    dense = tiny_model("llama", intermediate_size=256)
    held_out = _batches(seed=1)
    reference = _logits(dense, held_out)
    errors = {}
    for compensation in ("none", "least_squares"):
        model = copy.deepcopy(dense)
        config = PruningConfig(target_sparsity=0.3, importance="magnitude", structures=structures,
                               head_granularity="query_head", protected_layers=(0,), compensation=compensation,
                               compensation_ridge=0.01)
        prune_model(model, config, calibration_data=_batches(seed=0, count=32))
        errors[compensation] = float((_logits(model, held_out) - reference).pow(2).mean())
        record = attached(model)
        assert record is not None and bool(record.compensation) == (compensation != "none")
    # the same groups go either way (magnitude scores do not depend on the data): only compensation differs
    # measured: 0.86 (channels), 0.79 (heads and channels) of the uncompensated error
    assert errors["least_squares"] < at_most * errors["none"], errors


def test_the_record_replays_one_shot_compensation_on_the_original_weights():
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    config = PruningConfig(target_sparsity=0.4, importance="magnitude", structures=("heads", "channels"),
                           head_granularity="query_head", protected_layers=(0,), compensation="least_squares")
    prune_model(model, config, calibration_data=_batches(seed=0))
    record = attached(model)
    pruned = discover(model, protected_layers=())
    for layer in pruned.layers[1:]:
        for role in ("o_proj", "down_proj"):
            column_map = record.compensation.get(layer.index, role)
            original = discover(dense, protected_layers=()).layers[layer.index].projection(role).weight
            torch.testing.assert_close(column_map.apply(original.detach()), layer.projection(role).weight.detach(),
                                       rtol=0, atol=1e-5)
            kept = kept_features(layer, record.masks[layer.index], role).nonzero().squeeze(1)
            assert torch.equal(column_map.kept, kept)


def test_progressive_compensation_composes_into_one_map_per_projection(tmp_path):
    """Several mask updates, each compensating on top of the last: the record's single map reproduces the
    in-memory (fp32, frozen) base weights from the original ones."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    config = PruningConfig(target_sparsity=0.5, importance="activation_taylor", structures=("heads", "channels"),
                           head_granularity="query_head", protected_layers=(0,), prune_every=1,
                           compensation="least_squares", schedule="linear")
    trainer = PruningTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=4,
                               learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                               logging_steps=1),
        pruning_config=config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0),  # base frozen
        train_dataset=datasets.Dataset.from_list(alpaca_records(48)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    callback = trainer.pruning_callback
    assert callback.physically_pruned
    assert callback.compensator.updates >= 3  # several mask updates, each compensated
    record = attached(trainer.model)
    assert record is not None and record.masks == callback.removal_masks
    pruned = discover(trainer.model, protected_layers=())
    dense = discover(original, protected_layers=())
    checked = 0
    for layer in pruned.layers[1:]:
        for role in ("o_proj", "down_proj"):
            column_map = record.compensation.get(layer.index, role)
            assert column_map is not None
            expected = column_map.apply(dense.layers[layer.index].projection(role).weight.detach())
            actual = base_layer(layer.projection(role)).weight.detach()
            torch.testing.assert_close(expected, actual, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 6
    # the record travels in the pruning state (resume, export)
    state, _ = callback.state_dict()
    restored = CompensationRecord.from_state_dict(state)
    for key, column_map in record.compensation.maps.items():
        assert torch.equal(restored.maps[key].matrix, column_map.matrix)


def test_column_map_composition_matches_two_updates_applied_in_turn():
    torch.manual_seed(0)
    weight = torch.randn(5, 8)
    first = ColumnMap(torch.arange(8), torch.zeros(0, dtype=torch.long), torch.zeros(0, 8))
    m1 = torch.randn(2, 6)  # remove features 1 and 4 into the six others
    step1 = first.then(torch.tensor([1, 4]), m1)
    kept1 = torch.tensor([0, 2, 3, 5, 6, 7])
    w1 = weight[:, kept1] + weight[:, [1, 4]] @ m1
    torch.testing.assert_close(step1.apply(weight), w1)
    m2 = torch.randn(2, 4)  # then features 3 and 7 (positions 2 and 5 of the kept ones)
    step2 = step1.then(torch.tensor([3, 7]), m2)
    positions_kept, positions_gone = torch.tensor([0, 1, 3, 4]), torch.tensor([2, 5])
    w2 = w1[:, positions_kept] + w1[:, positions_gone] @ m2
    torch.testing.assert_close(step2.apply(weight), w2)
    assert step2.kept.tolist() == [0, 2, 5, 6]


def test_compensation_without_calibration_data_is_refused_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruningConfig(importance="magnitude", compensation="least_squares")
    with pytest.raises(ValueError, match="compensation='least_squares' needs forward passes: pass calibration_data"):
        prune_model(model, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    (dict(compensation="mean_and_more"), "compensation='mean_and_more': must be one of auto, least_squares, none"),
    (dict(compensation_ridge=-0.5), "compensation_ridge=-0.5: must be a finite number >= 0"),
    (dict(compensation_ridge=float("nan")), "compensation_ridge=nan"),
    (dict(compensation_tokens=0), "compensation_tokens=0: must be an integer >= 1"),
])
def test_bad_compensation_settings_are_refused(bad, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        PruningConfig(**bad)


def test_masks_compose_into_the_original_index_space():
    from hfprune.masking import LayerMask

    first = PruningMasks({0: LayerMask(torch.tensor([1, 1, 0, 1], dtype=torch.bool),
                                       torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool))})
    later = PruningMasks({0: LayerMask(torch.tensor([1, 0, 1], dtype=torch.bool),
                                       torch.tensor([0, 1, 1, 1], dtype=torch.bool))})
    both = first.compose(later)
    assert both[0].heads.tolist() == [True, False, False, True]
    assert both[0].channels.tolist() == [False, False, True, True, False, True]
    with pytest.raises(ValueError, match="layer 0: the later masks cover 3 heads"):
        PruningMasks({0: LayerMask(torch.ones(3, dtype=torch.bool), torch.ones(6, dtype=torch.bool))}).compose(later)


def _compensated_one_shot(original_dir, frozen: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32, attn_implementation="eager")
    model.requires_grad_(not frozen)  # frozen weights are re-read from the original; trainable ones from memory
    config = PruningConfig(target_sparsity=0.4, importance="magnitude", structures=("heads", "channels"),
                           head_granularity="query_head", protected_layers=(0,), compensation="least_squares")
    return prune_model(model.eval(), config, calibration_data=_batches(seed=0))


@pytest.mark.parametrize("frozen", [True, False])
def test_export_after_compensation_reloads_with_the_in_memory_logits(tmp_path, frozen):
    """Streamed from the original (frozen weights: the record is replayed on the full-precision tensors) or
    written from memory: either way the checkpoint computes what the pruned model in memory computes."""
    from transformers import AutoModelForCausalLM

    from hfprune import save_pruned

    tiny_model("llama").save_pretrained(tmp_path / "original")
    model = _compensated_one_shot(tmp_path / "original", frozen)
    out = save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "original")  # masks: the record's
    report = __import__("json").loads((out / "pruning_report.json").read_text())
    assert report["export"]["compensated_tensors"] == (6 if frozen else 0)  # o_proj + down_proj of layers 1-3
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    held_out = _batches(seed=3, count=2)
    torch.testing.assert_close(_logits(reloaded, held_out), _logits(model, held_out), atol=1e-5, rtol=1e-5)


def test_export_of_a_compensated_8bit_base_replays_the_maps_on_the_full_precision_original(tmp_path):
    """8-bit base + LoRA, progressive pruning with compensation: the export re-reads the bf16/fp32 original,
    replays the composed maps, merges LoRA. It must equal the fp32 reference computed by hand, and stay within
    the int8 quantization error of the in-memory model."""
    from transformers import AutoModelForCausalLM

    from hfprune.export.merge import lora_weight_delta

    from .tiny_models import save_tiny

    save_tiny("llama", tmp_path / "base")
    config = PruningConfig(target_sparsity=0.4, importance="lora", head_granularity="query_head",
                           protected_layers=(0,), prune_every=1, compensation="least_squares")
    trainer = PruningTrainer(
        model=str(tmp_path / "base"),  # 8-bit for the lora criterion
        args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                               learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0),
        pruning_config=config,
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)),
        processing_class=tiny_tokenizer(),
    )
    assert type(trainer.model.base_model.model.model.layers[1].mlp.down_proj.base_layer).__name__ == "Linear8bitLt"
    trainer.train()
    record = trainer.pruning_callback.compensator.record
    assert record
    out = trainer.save_model()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pruned = discover(trainer.model, protected_layers=())
    for layer in pruned.layers[1:]:
        for role in ("o_proj", "down_proj"):
            parent = "self_attn" if role == "o_proj" else "mlp"
            full = getattr(getattr(original.model.layers[layer.index], parent), role).weight.detach()
            expected = record.get(layer.index, role).apply(full) + lora_weight_delta(layer.projection(role))
            got = getattr(getattr(exported.model.layers[layer.index], parent), role).weight.detach()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        memory = trainer.model(input_ids=ids).logits
        reloaded = exported(input_ids=ids).logits
    assert (memory.argmax(-1) == reloaded.argmax(-1)).float().mean() > 0.9  # int8 vs full precision


def _resumable(tmp_path, name, resume=None):
    config = PruningConfig(target_sparsity=0.4, head_granularity="query_head", protected_layers=(0,), prune_every=1,
                           pruning_steps=6, warmup_ratio=0.2, cooldown_ratio=0.2)  # activation_taylor + compensation
    assert config.compensation == "auto"
    trainer = PruningTrainer(
        model=tiny_model("llama"),
        args=TrainingArguments(output_dir=str(tmp_path / name), max_steps=8, per_device_train_batch_size=4,
                               learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                               seed=0),
        pruning_config=config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0),
        train_dataset=datasets.Dataset.from_list(alpaca_records(48)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow  # three short trainings with checkpoints
def test_a_resumed_compensated_run_ends_where_the_uninterrupted_one_does(tmp_path):
    """The Trainer checkpoints the (compensated) adapters, not the frozen base: the pruning state carries the
    Gram statistics and the record, and a resume replays the record on the fresh base, before or after the
    physical removal."""
    reference = _resumable(tmp_path, "a")
    assert reference.pruning_callback.compensator.record
    final = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
    for step in (4, 8):  # mid-pruning (masks, Gram statistics), then after the weights were sliced at step 6
        resumed = _resumable(tmp_path, f"b{step}", resume=str(tmp_path / "a" / f"checkpoint-{step - 2}"))
        assert resumed.pruning_callback.removal_masks == reference.pruning_callback.removal_masks
        state = resumed.model.state_dict()
        assert state.keys() == final.keys()
        for key, value in final.items():  # fp32: one composed map vs successive updates differ by rounding only
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_with_compensation_the_dense_teacher_is_still_the_unpruned_model(tmp_path):
    """Compensation reconstructs the masked features in the mask hooks and leaves the weights alone until the
    slicing: with the hooks and adapters off (distillation's free teacher) the model is the dense original."""
    from transformers import TrainerCallback

    from hfprune.distill import teacher_logits

    original = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = original(input_ids=ids).logits
    seen = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                callback = trainer.pruning_callback
                assert callback.compensator.record and not callback.masks.is_full()
                seen["teacher"] = teacher_logits(model, {"input_ids": ids},
                                                 [callback.hooks, callback.criterion, callback.compensator])
                with torch.no_grad():
                    seen["student"] = model(input_ids=ids).logits

    config = PruningConfig(target_sparsity=0.4, protected_layers=(0,), prune_every=1, physical_removal="at_end",
                           pruning_steps=4, warmup_ratio=0.25, cooldown_ratio=0.0)
    trainer = PruningTrainer(
        model=copy.deepcopy(original),
        args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                               learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0),
        pruning_config=config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0),
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)),
        processing_class=tiny_tokenizer(),
        callbacks=[Probe()],
    )
    trainer.train()
    torch.testing.assert_close(seen["teacher"], dense, atol=1e-5, rtol=1e-5)
    assert (seen["student"] - dense).abs().max() > 1e-2  # the student is the pruned, compensated model


def test_grams_that_do_not_fit_stop_least_squares_up_front_and_auto_goes_without(monkeypatch, caplog):
    """Half the host memory is the limit: compensation='least_squares' raises before any weight moves;
    'auto' prunes without compensation and says why (warning; the callback's run summary shows the note)."""
    import collections

    import psutil

    from hfprune.compensator import GramMemoryError

    tiny_memory = collections.namedtuple("vmem", "available")(1024)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: tiny_memory)
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    config = PruningConfig(target_sparsity=0.3, importance="activation", protected_layers=(0,),
                           compensation="least_squares")
    with pytest.raises(GramMemoryError, match=r"compensation='least_squares' keeps Gram matrices of .* GiB in host "
                                               r"memory .* pass PruningConfig\(compensation='none'\)"):
        prune_model(model, config, calibration_data=_batches(seed=0))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    with caplog.at_level("WARNING", logger="hfprune.compensator"):
        prune_model(model, PruningConfig(target_sparsity=0.3, importance="activation", protected_layers=(0,)),
                    calibration_data=_batches(seed=0))
    assert not attached(model).compensation  # pruned, not compensated
    assert "compensation='auto' runs without compensation" in caplog.text
