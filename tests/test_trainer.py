"""PruningTrainer and PruningCallback end to end on tiny models."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from hfprune import PruningCallback, PruningConfig, PruningTrainer
from hfprune.sparsity import count_parameters
from hfprune.structure import discover

from .tiny_models import alpaca_records, save_tiny, tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=2, learning_rate=2e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_end_to_end_8bit_gqa_lora(tmp_path):
    save_tiny("llama", tmp_path / "base")
    config = PruningConfig(target_sparsity=0.5, importance="lora", head_granularity="kv_group", prune_every=1,
                           protected_layers=(0,))
    trainer = PruningTrainer(
        model=str(tmp_path / "base"),  # loaded 8-bit by default for the lora criterion
        args=_args(tmp_path),
        pruning_config=config,
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)),
        processing_class=tiny_tokenizer(),
    )
    q_proj = trainer.model.base_model.model.model.layers[1].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear8bitLt"
    before = count_parameters(trainer.model)
    structure = discover(trainer.model, protected_layers=(0,))
    prunable = structure.prunable_params()
    trainer.train()

    callback = trainer.pruning_callback
    assert callback.physically_pruned
    removed = before - count_parameters(trainer.model)
    assert removed == callback.sparsity().removed_params
    # exactly the target, to within one MLP channel per pruned layer
    assert abs(removed - 0.5 * prunable) <= 3 * (3 * 64)
    layers = discover(trainer.model).layers
    assert layers[0].num_heads == 8 and layers[0].intermediate_size == 96
    assert all(l.num_kv_heads == 1 and l.num_heads == 4 for l in layers[1:])  # one of two KV groups went
    # recovery ran on the smaller model, and the loss stayed finite throughout
    removal_step = next(e["step"] for e in callback.history if e["event"] == "physical_removal")
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert removal_step < trainer.state.max_steps and any(step > removal_step for step, _ in losses)
    assert all(math.isfinite(loss) for _, loss in losses)
    assert any("pruning/sparsity" in e for e in trainer.state.log_history)
    with torch.no_grad():
        ids = torch.randint(0, 100, (1, 8))
        assert torch.isfinite(trainer.model(input_ids=ids).logits).all()

    # save_model(): physically pruned, LoRA merged into the full-precision original, loadable
    from transformers import AutoModelForCausalLM

    out = trainer.save_model()
    assert out == tmp_path / "out" / "pruned" and (out / "pruning_report.json").exists()
    assert (tmp_path / "out").exists() and not list(out.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.model.layers[1].self_attn.k_proj.weight.shape == (8, 64)
    assert count_parameters(loaded) == count_parameters(trainer.model)
    assert loaded.dtype == torch.float32 and torch.isfinite(loaded(input_ids=ids).logits).all()


def test_sft_trainer_with_pruning_callback(tmp_path):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    model = tiny_model("qwen2")
    texts = [{"text": r["instruction"] + " " + r["output"]} for r in alpaca_records(32)]
    callback = PruningCallback(PruningConfig(target_sparsity=0.3, prune_every=1, protected_layers=(0,)))
    sft_args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=2, learning_rate=2e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
    )
    trainer = trl.SFTTrainer(
        model=model, args=sft_args, train_dataset=datasets.Dataset.from_list(texts),
        processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.physically_pruned
    assert 0.25 < callback.sparsity().sparsity < 0.35
    assert any("pruning/sparsity" in e for e in trainer.state.log_history)


@pytest.mark.parametrize("importance", ["taylor", "taylor2"])
def test_weight_gradient_criteria_refreeze_the_base_when_scoring_ends(tmp_path, importance):
    """Full weight gradients are needed while scoring only: recovery trains LoRA alone, on the sliced model
    (taylor2's Fisher accumulator, still fed in the cool-down, once crashed there on the old shapes)."""
    from peft import LoraConfig

    from hfprune.structure import base_layer

    # masks final at step 3, two cool-down steps, weights sliced at step 5, two recovery steps
    config = PruningConfig(target_sparsity=0.4, importance=importance, pruning_steps=5, cooldown_ratio=0.4,
                           warmup_ratio=0.2, prune_every=1, protected_layers=(0,))
    trainer = PruningTrainer(
        model=tiny_model("llama"), args=_args(tmp_path, max_steps=7), pruning_config=config,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)), processing_class=tiny_tokenizer(),
    )
    trainer.train()
    callback = trainer.pruning_callback
    assert callback.physically_pruned
    removal_step = next(e["step"] for e in callback.history if e["event"] == "physical_removal")
    assert removal_step == 5 and trainer.state.global_step == 7
    projections = [base_layer(layer.projection(role)) for layer in callback.structure.layers
                   for role in ("q_proj", "o_proj", "down_proj")]
    assert projections and all(not m.weight.requires_grad and m.weight.grad is None for m in projections)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if importance == "taylor2":
        assert not callback.criterion._handles and not callback.criterion._squares


def test_full_gradient_criterion_on_8bit_base_is_refused(tmp_path):
    save_tiny("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="importance='taylor' needs full weight gradients"):
        PruningTrainer(model=str(tmp_path / "base"), args=_args(tmp_path), load_in_8bit=True,
                       pruning_config=PruningConfig(importance="taylor"))


def test_lora_not_covering_projections_is_refused(tmp_path):
    from peft import LoraConfig

    save_tiny("llama", tmp_path / "base")
    trainer = PruningTrainer(
        model=str(tmp_path / "base"), args=_args(tmp_path, max_steps=2), load_in_8bit=False,
        pruning_config=PruningConfig(importance="lora"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        train_dataset=datasets.Dataset.from_list(alpaca_records(8)), processing_class=tiny_tokenizer(),
    )
    with pytest.raises(ValueError, match="importance='lora' reads the LoRA factors.*k_proj"):
        trainer.train()


def _run(args, env=None):
    result = subprocess.run([sys.executable, "-m", "tests.run_tiny_training", *args], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=600)
    return result


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_masks_and_weights(tmp_path):
    reference = _run([str(tmp_path / "a")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = _run([str(tmp_path / "b"), "--kill-at", "8"])  # killed -9 after the step-8 checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not os.path.exists(tmp_path / "b" / "final.safetensors")
    resumed = _run([str(tmp_path / "b"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "a" / "final.safetensors")
    b = load_file(tmp_path / "b" / "final.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("removal.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_two_process_gloo_ranks_hold_identical_masks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
         "-m", "tests.run_tiny_training", str(tmp_path / "ddp"), "--max-steps", "8"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    r0 = load_file(tmp_path / "ddp" / "final-rank0.safetensors")
    r1 = load_file(tmp_path / "ddp" / "final-rank1.safetensors")
    removal = [k for k in r0 if k.startswith("removal.masks.")]
    assert removal and not all(bool(r0[k].all()) for k in removal)  # pruning happened (sliced at train end)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_distillation_from_the_free_dense_teacher(tmp_path, monkeypatch):
    from hfprune import distill

    save_tiny("llama", tmp_path / "base")
    calls = []
    real_step = distill.distillation_step
    monkeypatch.setattr(distill, "distillation_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    trainer = PruningTrainer(
        model=str(tmp_path / "base"), args=_args(tmp_path, max_steps=6), load_in_8bit=False,
        pruning_config=PruningConfig(target_sparsity=0.3, prune_every=1, protected_layers=(0,),
                                     physical_removal="at_end"),
        distillation=distill.DistillationConfig(alpha=0.5, temperature=2.0),
        train_dataset=datasets.Dataset.from_list(alpaca_records(16)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert len(calls) == 6  # one teacher + student step per optimizer step, through the whole run
    assert trainer.pruning_callback.physically_pruned  # sliced once training ended
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert abs(trainer.pruning_callback.sparsity().sparsity - 0.3) < 0.02
    # the loss parts reach the logs (logging_steps=1: one step's parts per entry), and they add up to the loss
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 6 and all({"distill/ce", "distill/kl"} <= set(e) for e in logged)
    for entry in logged:
        expected = 0.5 * entry["distill/ce"] + 0.5 * 2.0**2 * entry["distill/kl"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_distillation_normalises_like_the_trainer(tmp_path, accepts_loss_kwargs):
    """The label-token count over all accumulated micro-batches normalises the loss only when the Trainer
    will not divide by the accumulation steps itself, exactly as Trainer.compute_loss decides."""
    from hfprune import DistillationConfig

    trainer = PruningTrainer(
        model=tiny_model("llama"), args=_args(tmp_path, max_steps=1), load_in_8bit=False,
        pruning_config=PruningConfig(target_sparsity=0.3, protected_layers=(0,)),
        distillation=DistillationConfig(alpha=0.0),  # the loss is the label cross-entropy alone
        train_dataset=datasets.Dataset.from_list(alpaca_records(8)), processing_class=tiny_tokenizer(),
    )
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.train()
    with torch.no_grad():
        mean = trainer.compute_loss(trainer.model, dict(batch))
        over_four_times_the_tokens = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=4 * labelled)
    expected = mean / 4 if accepts_loss_kwargs else mean
    assert over_four_times_the_tokens == pytest.approx(expected.item(), rel=1e-4)


def test_an_8bit_base_gets_adapters_whatever_the_criterion(tmp_path):
    """A quantized base trains only through adapters: activation_taylor on an 8-bit base gets the default LoRA."""
    from peft import PeftModel

    save_tiny("llama", tmp_path / "base")
    trainer = PruningTrainer(
        model=str(tmp_path / "base"), args=_args(tmp_path, max_steps=2), load_in_8bit=True,
        pruning_config=PruningConfig(target_sparsity=0.3, importance="activation_taylor", protected_layers=(0,)),
        train_dataset=datasets.Dataset.from_list(alpaca_records(8)), processing_class=tiny_tokenizer(),
    )
    assert isinstance(trainer.model, PeftModel)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert trainer.state.global_step == 2


def test_8bit_base_goes_to_this_process_gpu(monkeypatch):
    """Under DDP every rank loads its quantized copy on its own GPU (LOCAL_RANK), never all on GPU 0."""
    from hfprune import trainer as trainer_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert trainer_module._kbit_device_map() == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert trainer_module._kbit_device_map() == {"": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer_module._kbit_device_map() == "cpu"
