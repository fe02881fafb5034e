"""A 4-bit base through the engine: PruningTrainer / PruningCallback (LoRA criterion, resume mid-pruning),
one-shot prune_model of 8-bit and 4-bit bases exported from the full-precision original and reloaded, recipes,
and the bad input refused before any work. Tiny models of FOUR_BIT_SIZES on the CPU."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

from hfprune import PruningCallback, PruningConfig, PruningTrainer, discover, prune_model, remove_pruned_groups, removal
from hfprune.bnb4bit import is_4bit_linear
from hfprune.export import save_pruned
from hfprune.sparsity import count_parameters
from hfprune.structure import base_layer

from .tiny_models import FOUR_BIT_SIZES, alpaca_records, batch, load_4bit, save_tiny, tiny_tokenizer

pytest.importorskip("bitsandbytes")

CONFIG = dict(prune_every=1, protected_layers=(0,), round_channels_to=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("four_bit_training") / "base"
    save_tiny("llama", path, **FOUR_BIT_SIZES)
    return path


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=2, learning_rate=2e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---- PruningTrainer ----------------------------------------------------------------------------------------------


def test_trainer_load_in_4bit_prunes_trains_and_exports(base_dir, tmp_path):
    trainer = PruningTrainer(
        model=str(base_dir), args=_args(tmp_path), load_in_4bit=True,
        pruning_config=PruningConfig(target_sparsity=0.3, **CONFIG),
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)), processing_class=tiny_tokenizer(),
    )
    down = trainer.model.base_model.model.model.layers[1].mlp.down_proj
    state = base_layer(down).weight.quant_state
    # QLoRA's defaults: NF4, double quantization, bfloat16 compute
    assert is_4bit_linear(base_layer(down)) and state.quant_type == "nf4" and state.nested
    assert base_layer(down).compute_dtype == torch.bfloat16
    before = count_parameters(trainer.model)
    trainer.train()
    callback = trainer.pruning_callback
    assert callback.physically_pruned
    assert before - count_parameters(trainer.model) == callback.sparsity().removed_params > 0
    assert is_4bit_linear(base_layer(down)) and base_layer(down).in_features < 256
    assert down.lora_A["default"].weight.shape[1] == base_layer(down).in_features
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))

    out = trainer.save_model()
    report = (out / "pruning_report.json").read_text()
    assert '"streamed_from_original": true' in report
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert count_parameters(exported) == count_parameters(trainer.model)
    assert torch.isfinite(_logits(exported, batch())).all()


def _resumable_run(base_dir, out, resume=None):
    # Bit-identical resumes: without compensation (with it, a resume replays one composed map on the re-loaded
    # 4-bit base, which re-quantizes differently from the run's successive updates: tests/test_compensation_engine.py)
    config = PruningConfig(target_sparsity=0.3, pruning_steps=6, warmup_ratio=0.2, cooldown_ratio=0.2,
                           compensation="none", **CONFIG)
    trainer = PruningTrainer(
        model=str(base_dir),
        args=_args(out, max_steps=8, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_compute_dtype=torch.float32),
        pruning_config=config, train_dataset=datasets.Dataset.from_list(alpaca_records(64)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train(resume_from_checkpoint=resume)
    callback = trainer.pruning_callback
    lora = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    return callback.removal_masks, lora, trainer


def test_resume_mid_pruning_and_after_the_4bit_surgery_ends_the_same(base_dir, tmp_path):
    masks, lora, trainer = _resumable_run(base_dir, tmp_path / "a")
    removal_step = next(e["step"] for e in trainer.pruning_callback.history if e["event"] == "physical_removal")
    assert removal_step == 6 and masks is not None
    checkpoints = tmp_path / "a" / "out"
    for step in (4, 8):  # masks half-way; then weights sliced and re-quantized, recovery running
        resumed_masks, resumed_lora, _ = _resumable_run(base_dir, tmp_path / f"b{step}",
                                                        resume=str(checkpoints / f"checkpoint-{step - 2}"))
        assert resumed_masks == masks
        assert resumed_lora.keys() == lora.keys()
        for key in lora:
            torch.testing.assert_close(resumed_lora[key], lora[key], atol=1e-6, rtol=1e-5, msg=key)


# ---- one shot, exported --------------------------------------------------------------------------------------------


def _load_8bit(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu", dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_one_shot_prune_of_a_quantized_base_exports_from_the_original(base_dir, tmp_path, kind):
    model = _load_8bit(base_dir) if kind == "8bit" else load_4bit(base_dir, "nf4", double_quant=True)
    calibration = [{"input_ids": batch(seq_len=16, seed=s)} for s in range(4)]
    # no compensation: the export must be exactly the original sliced by the recorded masks
    config = PruningConfig(importance="activation", target_sparsity=0.3, compensation="none", **CONFIG)
    prune_model(model, config, calibration_data=calibration)
    record = removal.attached(model)
    assert record is not None and not record.masks.is_full()

    out = save_pruned(model, tmp_path / "out", original_checkpoint=base_dir)  # no masks: the record is used
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # exactly the full-precision original, sliced by the recorded masks
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    remove_pruned_groups(discover(reference, protected_layers=()), record.masks)
    held_out = batch(seq_len=16, seed=99)
    torch.testing.assert_close(_logits(exported, held_out), _logits(reference, held_out), atol=1e-5, rtol=1e-5)
    exported_widths = [(l.num_heads, l.num_kv_heads, l.intermediate_size) for l in discover(exported).layers]
    assert exported_widths == [(l.num_heads, l.num_kv_heads, l.intermediate_size) for l in discover(model).layers]

    # the in-memory quantized model differs from its export by the quantization error only (tiny random model,
    # logits up to ~8.5, measured max |logit diff|: 8-bit 1.91 (the unpruned fp32 vs 8-bit model: 1.33),
    # 4-bit NF4 6.64 (unpruned: 10.41); the 4-bit reload vs the export 6.32)
    gap = (_logits(exported, held_out) - _logits(model, held_out)).abs().max()
    unpruned = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    quantized = _load_8bit(base_dir) if kind == "8bit" else load_4bit(base_dir, "nf4", double_quant=True)
    quantization_gap = (_logits(unpruned, held_out) - _logits(quantized, held_out)).abs().max()
    assert gap < 2 * quantization_gap

    reloaded = _load_8bit(out) if kind == "8bit" else load_4bit(out, "nf4", double_quant=True)
    assert torch.isfinite(_logits(reloaded, held_out)).all()
    if kind == "4bit":
        assert is_4bit_linear(reloaded.model.layers[1].mlp.down_proj)
    reloaded_gap = (_logits(reloaded, held_out) - _logits(exported, held_out)).abs().max()
    assert reloaded_gap < 2 * quantization_gap


# ---- refused before any work -------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    from hfprune import trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(trainer_module, "load_model", refuse)


@pytest.mark.parametrize("importance", ["taylor", "taylor2", "vector"])
def test_full_gradient_criteria_on_a_4bit_base_are_refused_before_loading(base_dir, tmp_path, no_loading, importance):
    with pytest.raises(ValueError, match=rf"importance='{importance}' needs full weight gradients, which a 4-bit "
                                         r"base cannot have.*load_in_4bit"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path), load_in_4bit=True,
                       pruning_config=PruningConfig(importance=importance))
    with pytest.raises(ValueError, match=rf"importance='{importance}' needs full weight gradients, which a 4-bit"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path),
                       quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                       pruning_config=PruningConfig(importance=importance))


def test_4bit_and_8bit_together_and_unknown_quant_types_are_refused_before_loading(base_dir, tmp_path, no_loading):
    with pytest.raises(ValueError, match="load_in_4bit=True with load_in_8bit=True: a base is quantized one way"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path), load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="load_in_4bit=True with a quantization_config"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path), load_in_4bit=True,
                       quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type='int4': bitsandbytes' 4-bit layers are nf4 or fp4"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path),
                       quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"))
    with pytest.raises(ValueError, match="quantization_config has load_in_8bit=True and load_in_4bit=True"):
        PruningTrainer(model=str(base_dir), args=_args(tmp_path),
                       quantization_config={"load_in_8bit": True, "load_in_4bit": True})


def test_full_gradient_criteria_on_a_loaded_4bit_model_are_refused_before_work(base_dir, tmp_path):
    model = load_4bit(base_dir)
    widths = [base_layer(m).in_features for m in model.modules() if is_4bit_linear(m)]
    with pytest.raises(ValueError, match="importance='taylor' needs full weight gradients, which a 4-bit base"):
        prune_model(model, PruningConfig(importance="taylor", **CONFIG), calibration_data=[{"input_ids": batch()}])
    assert widths == [m.in_features for m in model.modules() if is_4bit_linear(m)]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="importance='taylor' needs full weight gradients, which a 4-bit base"):
        PruningTrainer(model=model, args=_args(tmp_path), pruning_config=PruningConfig(importance="taylor"))

    # a plain Trainer with the callback: refused when training begins, before the first step
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    callback = PruningCallback(PruningConfig(importance="taylor", **CONFIG))
    trainer = Trainer(model=peft_model, args=_args(tmp_path, max_steps=2), callbacks=[callback],
                      train_dataset=datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4))
    with pytest.raises(ValueError, match="importance='taylor' needs full weight gradients, which a 4-bit base"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_recipes_take_a_4bit_base_and_refuse_what_it_cannot_do(tmp_path):
    from hfprune.estimate import recipe_settings
    from hfprune.recipes import RecipeError, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: org/model, model_config: smollm2-135m}\n"
                    "pruning: {target_sparsity: 0.3, importance: activation_taylor}\ntraining: {max_steps: 10}\n")
    recipe = load_recipe(path, ["model.load_in_4bit=true", "model.bnb_4bit_quant_type=fp4"])
    quantization = recipe.model.quantization_config()
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "fp4"
    assert quantization.bnb_4bit_use_double_quant and quantization.bnb_4bit_compute_dtype == torch.bfloat16
    settings = recipe_settings(recipe)
    assert settings["load_in_4bit"] and not settings["load_in_8bit"] and settings["double_quant"]
    assert load_recipe(path).model.quantization_config() is None

    refused = {
        ("model.load_in_4bit=true", "model.load_in_8bit=true"): "load_in_4bit=true with load_in_8bit=true",
        ("model.load_in_4bit=true", "pruning.importance=taylor"):
            "model.load_in_4bit=true with pruning.importance='taylor': this criterion needs full weight gradients",
        ("model.load_in_4bit=true", "model.bnb_4bit_quant_type=int4"): "bnb_4bit_quant_type.*int4.*nf4.*fp4",
        ("model.bnb_4bit_quant_type=fp4",): "bnb_4bit_quant_type='fp4' without load_in_4bit=true",
    }
    for overrides, message in refused.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe(path, list(overrides))

