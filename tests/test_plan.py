"""Dry runs on the meta device: full-size models in seconds, the same widths as a real pruning."""

from __future__ import annotations

import time

import pytest
import torch

from hfprune import PruningConfig, prune_model
from hfprune.sparsity import count_parameters
from hfprune.plan import PLACEHOLDER_NOTE, dry_run, steps_for
from hfprune.schedule import PruningSchedule
from hfprune.structure import discover

from .tiny_models import tiny_config, tiny_model


def test_llama_65b_plans_in_seconds_without_memory():
    start = time.perf_counter()
    plan = dry_run("llama-65b", PruningConfig(target_sparsity=0.5, head_granularity="kv_group"), total_steps=800)
    seconds = time.perf_counter() - start
    assert seconds < 30, f"a 65B dry run took {seconds:.1f} s"
    assert plan.num_layers == 80 and plan.params_before == 65_285_660_672
    assert [l.index for l in plan.layers if l.protected] == [0, 1, 2, 3, 4, 5, 6, 7, 79]
    assert plan.layers[8].after == {"num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008}
    assert plan.reached_sparsity == pytest.approx(0.5, abs=1e-4)
    assert plan.params_before - plan.params_after == plan.removed_params
    assert plan.checkpoint["kind"] == "heterogeneous" and plan.checkpoint["model_type"] == "hfprune_llama"
    text = plan.to_text()
    assert "8-78" in text and "64 -> 32" in text and "22016 -> 11008" in text and "65.29B -> 36.55B" in text
    assert PLACEHOLDER_NOTE in text


def test_same_inputs_give_the_same_plan():
    for config in (PruningConfig(target_sparsity=0.4, seed=3), PruningConfig(target_sparsity=0.4, ranking="global")):
        first = dry_run(tiny_config("qwen2"), config, total_steps=50).to_dict(timings=False)
        second = dry_run(tiny_config("qwen2"), config, total_steps=50).to_dict(timings=False)
        assert first == second


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "qwen3"])
@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(target_sparsity=0.5, importance="magnitude", protected_layers=(0,)),
        PruningConfig(target_sparsity=0.3, importance="magnitude", head_granularity="query_head",
                      protected_layers=(3,)),
        PruningConfig(head_sparsity=0.5, channel_sparsity=0.25, importance="magnitude"),
    ],
    ids=["kv_group", "query_head", "separate"],
)
def test_plan_predicts_the_widths_of_a_real_pruning(arch, config):
    """With local ranking the counts do not depend on the scores: the plan matches real magnitude pruning."""
    plan = dry_run(tiny_config(arch), config)
    model = prune_model(tiny_model(arch), config)
    real = {layer.index: layer.widths() for layer in discover(model, protected_layers=())}
    assert {layer.index: layer.after for layer in plan.layers} == real
    assert plan.params_after == count_parameters(model)


def test_uniform_export_needs_widths_a_stock_config_accepts():
    # 20% of 32 heads leaves 26, which a stock LlamaConfig (hidden 4096) rejects: said before any training.
    with pytest.raises(ValueError, match=r"uniform=True: a stock llama config rejects.*round_heads_to"):
        dry_run("llama-7b", PruningConfig(target_sparsity=0.2, uniform=True, head_granularity="kv_group"))
    plan = dry_run("llama-7b", PruningConfig(target_sparsity=0.2, uniform=True, round_heads_to=8,
                                             head_granularity="kv_group"))
    assert plan.checkpoint["kind"] == "uniform" and plan.checkpoint["model_type"] == "llama"
    # Rounding only ever keeps more heads: 26 is not a multiple of 8, so the heads stay and channels pay.
    assert {tuple(l.after.values()) for l in plan.layers} == {(32, 32, 7714)}
    assert plan.reached_sparsity == pytest.approx(0.2, abs=1e-3)


def test_target_that_would_empty_a_layer_is_refused():
    with pytest.raises(ValueError, match="target_sparsity=0.9: layer 0 can give up at most"):
        dry_run(tiny_config("llama"), PruningConfig(target_sparsity=0.9, structures=("heads",), protected_layers=()))


def test_schedule_lists_the_update_steps():
    config = PruningConfig(target_sparsity=0.3, pruning_fraction=0.8, prune_every=7)
    plan = dry_run(tiny_config("llama"), config, total_steps=100)
    expected = PruningSchedule(total_steps=80, schedule="cubic", warmup_ratio=0.1, cooldown_ratio=0.1, prune_every=7)
    assert plan.schedule["pruning_steps"] == 80 and plan.schedule["update_steps"] == expected.update_steps()
    assert plan.schedule["progress"][-1] == 1.0 and plan.schedule["progress"] == sorted(plan.schedule["progress"])
    assert "mask updates" in plan.to_text()
    with pytest.raises(ValueError, match="pruning_steps=120 exceeds the run's 100 optimizer steps"):
        dry_run(tiny_config("llama"), PruningConfig(pruning_steps=120), total_steps=100)


def test_lora_adapters_are_sliced_on_meta_too():
    plan = dry_run(tiny_config("llama"), PruningConfig(target_sparsity=0.5, protected_layers=(0,)), with_lora=True)
    assert any("LoRA adapters" in note for note in plan.notes)
    assert plan.params_before - plan.params_after == plan.removed_params  # LoRA factors are not counted


def test_a_surgery_failure_on_meta_is_reported_not_hidden(monkeypatch):
    import hfprune.surgery

    def broken(structure, masks):
        raise RuntimeError("cannot slice")

    monkeypatch.setattr(hfprune.surgery, "remove_pruned_groups", broken)
    plan = dry_run(tiny_config("llama"), PruningConfig(target_sparsity=0.5, protected_layers=(0,),
                                                       head_granularity="kv_group"))
    assert any("physical removal FAILED on meta tensors: RuntimeError: cannot slice" in n for n in plan.notes)
    assert plan.checkpoint["kind"] == "unknown" and plan.layers[1].after["num_key_value_heads"] == 1


def test_global_ranking_says_the_split_is_one_of_many():
    plan = dry_run(tiny_config("llama"), PruningConfig(target_sparsity=0.3, ranking="global"))
    assert any("ranking='global'" in note for note in plan.notes)
    assert plan.reached_sparsity == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("examples, batch, accumulation, epochs", [(37, 3, 2, 2), (64, 4, 4, 1), (10, 8, 1, 3.5)])
def test_step_count_matches_the_trainer(tmp_path, examples, batch, accumulation, epochs):
    import datasets
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, use_cpu=True,
                             gradient_accumulation_steps=accumulation, num_train_epochs=epochs, report_to=[],
                             remove_unused_columns=False)
    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * examples, "labels": [[1, 2, 3]] * examples})
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data)
    max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    assert steps_for(examples, args) == max_steps


def test_uniform_settings_no_layer_can_satisfy_are_refused():
    # A stock config has one width for every layer: protecting layers contradicts uniform widths.
    with pytest.raises(ValueError, match=r"uniform=True with protected_layers=\(0,\).*cannot protect layers"):
        dry_run(tiny_config("llama"), PruningConfig(uniform=True, protected_layers=(0,)))
    # Uniform pruning of a model whose layers already differ (a heterogeneous checkpoint) cannot be uniform.
    from hfprune.allocation import check_feasible
    from hfprune.structure import discover_for_config

    model = prune_model(tiny_model("llama"), PruningConfig(target_sparsity=0.5, importance="magnitude",
                                                           protected_layers=(0,)))
    config = PruningConfig(target_sparsity=0.2, uniform=True)
    with pytest.raises(ValueError, match="uniform=True needs identical prunable layers; found widths"):
        check_feasible(discover_for_config(model, config), config)
