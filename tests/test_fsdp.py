"""Sharded training: FSDP2 (`fully_shard`) on 2 CPU processes (gloo) scores with activation_taylor, averages the
ranks' scores, masks by hooks, never slices, and exports from the original checkpoint + gathered LoRA; the result
equals one process on the whole batch. And what sharding cannot do is refused before the first step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

import hfprune  # noqa: F401  (registers the heterogeneous export classes)
from hfprune import PruningCallback, PruningConfig, discover, distributed, remove_pruned_groups
from hfprune.export import save_pruned, save_pruned_from_adapters

from .tiny_models import LORA_TARGETS, batch, save_tiny, tiny_model, with_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29651",
         "-m", "tests.run_fsdp_pruning", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    reference = subprocess.run([sys.executable, "-m", "tests.run_fsdp_pruning", str(tmp_path), "--reference"],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]
    r0, r1 = (load_file(tmp_path / f"masks-rank{r}.safetensors") for r in (0, 1))
    one = load_file(tmp_path / "masks-reference.safetensors")
    masks = [k for k in r0 if k.startswith("masks.")]
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank holds the same masks and LoRA factors
    assert not all(bool(r0[k].all()) for k in masks)  # groups were removed
    # the ranks' averaged scores rank exactly as one process seeing both halves of every batch
    assert all(torch.equal(r0[k], one[k]) for k in masks)
    for key in (k for k in r0 if k.startswith("lora.") and r0[k].shape == one[k].shape):
        torch.testing.assert_close(r0[key], one[key], atol=1e-6, rtol=1e-5, msg=key)
    ids = batch(seed=5)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export-rank0")(input_ids=ids).logits
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "export-reference")(input_ids=ids).logits
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)  # measured 1.2e-5


def test_export_from_adapters_equals_slicing_in_memory(tmp_path):
    from peft import LoraConfig

    save_tiny("llama", tmp_path / "base")
    model = with_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), b_std=0.05)
    lora_state = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    structure = discover(model, protected_layers=(0,))
    config = PruningConfig(importance="magnitude", target_sparsity=0.4, protected_layers=(0,))
    from hfprune.allocation import allocate
    from hfprune.importance import ScoreAccumulator, get_importance, score_model

    accumulator = ScoreAccumulator()
    score_model(structure, get_importance("magnitude"), accumulator)
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)
    from_adapters = save_pruned_from_adapters(tmp_path / "adapters", original_checkpoint=tmp_path / "base",
                                              masks=masks, lora_config=lora_config, lora_state=lora_state)
    remove_pruned_groups(structure, masks)
    in_memory = save_pruned(model, tmp_path / "memory", masks=masks, original_checkpoint=tmp_path / "base")
    assert (from_adapters / "model.safetensors").read_bytes() == (in_memory / "model.safetensors").read_bytes()
    assert (from_adapters / "config.json").read_text() == (in_memory / "config.json").read_text()

    wrong = dict(lora_state)
    wrong.pop(next(iter(wrong)))
    with pytest.raises(ValueError, match="lora_state does not match lora_config's adapters: missing"):
        save_pruned_from_adapters(tmp_path / "bad", original_checkpoint=tmp_path / "base", masks=masks,
                                  lora_config=lora_config, lora_state=wrong)
    assert not (tmp_path / "bad").exists()


def _begin(callback, model):
    args = TrainingArguments(output_dir="unused", max_steps=4, report_to=[], use_cpu=True)
    callback.on_train_begin(args, TrainerState(max_steps=4), TrainerControl(), model=model)


@pytest.mark.parametrize("importance", ["lora", "magnitude", "activation", "taylor"])
def test_criteria_that_read_weights_are_refused_on_a_sharded_model(monkeypatch, importance):
    monkeypatch.setattr(distributed, "sharding", lambda model: "fsdp")
    model = with_lora(tiny_model("llama"), b_std=0.05)
    with pytest.raises(ValueError, match=rf"importance='{importance}'.*which FSDP keeps as shards: under FSDP use "
                                         r"importance='activation_taylor'"):
        _begin(PruningCallback(PruningConfig(importance=importance, protected_layers=(0,))), model)


def test_zero3_compensation_and_in_memory_export_are_refused_on_a_sharded_model(monkeypatch, tmp_path):
    model = with_lora(tiny_model("llama"), b_std=0.05)
    monkeypatch.setattr(distributed, "sharding", lambda model: "deepspeed")
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 partitions every parameter"):
        _begin(PruningCallback(PruningConfig(importance="activation_taylor")), model)
    monkeypatch.setattr(distributed, "sharding", lambda model: "fsdp")
    with pytest.raises(ValueError, match="compensation='least_squares' updates weights, which fsdp keeps as shards"):
        _begin(PruningCallback(PruningConfig(importance="activation_taylor", compensation="least_squares")), model)
    with pytest.raises(ValueError, match="fsdp shards: export with hfprune.export.save_pruned_from_adapters"):
        save_pruned(model, tmp_path / "out")
    callback = PruningCallback(PruningConfig(importance="activation_taylor", protected_layers=(0,)))
    _begin(callback, model)  # the one criterion that needs no weight is accepted
    assert callback.sharding == "fsdp" and not callback.allow_physical_removal


def test_scores_pass_through_unchanged_without_a_process_group():
    model = tiny_model("llama")
    structure = discover(model, protected_layers=(0,))
    scores = {layer.index: {"q_proj": torch.ones(layer.num_heads)} for layer in structure.prunable_layers}
    assert distributed.average_scores(scores, structure) is scores
    assert not distributed.needs_score_averaging(hfprune.importance.get_importance("activation_taylor"))
    assert distributed.sharding(model) is None
