"""The real SmolLM2-135M-Instruct (9 query heads, 3 KV heads): slow tests."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from hfprune import PruningConfig, PruningTrainer, prune_model
from hfprune.sparsity import count_parameters
from hfprune.data import calibration_batches, read_texts
from hfprune.evaluation import perplexity
from hfprune.structure import discover

pytestmark = pytest.mark.slow

PPL = dict(seq_len=128, max_windows=16)


def _ask(model, tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_engine_prunes_smollm2_and_it_still_talks(smollm2_path, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    wiki = str(data_dir / "wiki_demo.txt")
    dense_ppl = perplexity(model, tokenizer, wiki, **PPL).ppl
    before = count_parameters(model)
    calibration = calibration_batches(tokenizer, read_texts(str(data_dir / "c4_demo.jsonl"), limit=40),
                                      num_samples=8, seq_len=128, batch_size=4)
    # 10% of the prunable parameters, MLP channels only: small dense models are fragile (see DESIGN.md)
    config = PruningConfig(target_sparsity=0.1, importance="taylor", structures=("channels",))
    prune_model(model, config, calibration_data=calibration)
    layers = discover(model).layers
    assert all(l.num_heads == 9 and l.num_kv_heads == 3 for l in layers)
    assert layers[0].intermediate_size == 1536 and layers[10].intermediate_size < 1536
    pruned_ppl = perplexity(model, tokenizer, wiki, **PPL).ppl
    print(f"SmolLM2 wiki_demo ppl (128-token windows): dense {dense_ppl:.2f}, 10% channels pruned {pruned_ppl:.2f}; "
          f"params {before} -> {count_parameters(model)}")
    assert math.isfinite(pruned_ppl) and pruned_ppl < 3 * dense_ppl
    answer = _ask(model, tokenizer, "What is the capital of France?")
    print("answer:", answer)
    assert "Paris" in answer


class _PerplexityAtRemoval(TrainerCallback):
    def __init__(self, tokenizer, path):
        self.tokenizer, self.path, self.ppl = tokenizer, path, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.ppl is None and self.trainer_callback.physically_pruned:
            model.eval()
            self.ppl = perplexity(model, self.tokenizer, self.path, **PPL).ppl
            model.train()


def test_lora_pruning_on_8bit_base_then_recovery_improves_perplexity(smollm2_path, data_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    texts = read_texts(str(data_dir / "c4_demo.jsonl"), limit=200)
    train = datasets.Dataset.from_dict({"text": texts})
    wiki = str(data_dir / "wiki_demo.txt")
    probe = _PerplexityAtRemoval(tokenizer, wiki)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=2, learning_rate=1e-3,
        warmup_steps=2, logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )
    config = PruningConfig(target_sparsity=0.2, importance="lora", pruning_steps=6, prune_every=2,
                           structures=("channels",))
    trainer = PruningTrainer(model=str(smollm2_path), args=args, pruning_config=config, train_dataset=train,
                             processing_class=tokenizer, max_length=128, callbacks=[probe])
    probe.trainer_callback = trainer.pruning_callback
    assert type(trainer.model.base_model.model.model.layers[5].mlp.up_proj.base_layer).__name__ == "Linear8bitLt"
    trainer.train()
    assert trainer.pruning_callback.physically_pruned
    report = trainer.pruning_callback.sparsity()
    assert abs(report.sparsity - 0.2) < 0.005
    trainer.model.eval()
    recovered = perplexity(trainer.model, tokenizer, wiki, **PPL).ppl
    print(f"SmolLM2 8-bit lora 20%: ppl right after pruning {probe.ppl:.2f}, after 14 recovery steps {recovered:.2f}")
    assert math.isfinite(probe.ppl) and recovered < probe.ppl
