"""Export: a pruned model becomes a safetensors checkpoint that loads everywhere, bit for bit."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hfprune import PruningConfig, discover, prune_model, remove_pruned_groups
from hfprune.allocation import allocate
from hfprune.sparsity import count_parameters
from hfprune.export import check_no_pickles, register_auto_classes, save_pruned, validate_checkpoint_shapes
from hfprune.export.safety import PickleCheckpointError
from hfprune.importance import ScoreAccumulator, get_importance
from hfprune.importance import score_model

from .tiny_models import ARCHITECTURES, batch, tiny_model

register_auto_classes()  # what `import hfprune` does; idempotent

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def _masks(structure, config):
    criterion = get_importance(config.importance)
    criterion.seed = 3
    accumulator = ScoreAccumulator(normalize=False)
    score_model(structure, criterion, accumulator)
    return allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)


def _pruned(arch: str, uniform: bool, **overrides):
    model = tiny_model(arch)
    # 0.5 removes KV groups in every family (0.3 would only take MLP channels where there are 2 KV heads)
    kwargs = dict(importance="magnitude", target_sparsity=0.5, **overrides)
    if uniform:
        kwargs.update(uniform=True, protected_layers=())
    else:
        kwargs.update(protected_layers=(0,))
    return prune_model(model, PruningConfig(**kwargs))


def _cast_parameters(model, dtype):
    """The model with its parameters in `dtype`; buffers (rotary inv_freq) stay as transformers keeps them."""
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# ---- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("uniform", [False, True], ids=["heterogeneous", "uniform"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_round_trip_reloads_the_same_model(arch, uniform, dtype, tmp_path):
    model = _pruned(arch, uniform)
    out = save_pruned(model, tmp_path / "out", dtype=dtype, uniform=uniform or None)
    config = json.loads((out / "config.json").read_text())
    files = {p.name for p in out.iterdir()}
    if uniform:
        assert config["model_type"] == model.config.model_type and "auto_map" not in config
        assert "modeling_hfprune.py" not in files and "per_layer_config" not in config
        assert config["head_dim"] == model.config.head_dim
    else:
        assert config["model_type"] == f"hfprune_{model.config.model_type}"
        assert {"configuration_hfprune.py", "modeling_hfprune.py"} <= files
        assert config["per_layer_config"] and "0" not in config["per_layer_config"]  # layer 0 protected
    assert config["dtype"] == str(dtype).removeprefix("torch.")

    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")  # no trust_remote_code
    assert reloaded.dtype == dtype
    assert type(reloaded).__name__.startswith("Hfprune") != uniform
    ids = batch()
    if dtype == torch.float32:
        torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
        if not uniform:
            with torch.no_grad():
                expected = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
                assert torch.equal(reloaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), expected)
    else:
        assert torch.equal(_logits(reloaded, ids), _logits(_cast_parameters(model, dtype), ids))


@pytest.mark.slow  # a second Python process
def test_query_head_granularity_round_trip_keeps_kv_heads_with_fewer_query_heads(tmp_path):
    """Every KV head kept, fewer query heads per group in the pruned layers: num_key_value_groups differs per layer."""
    model = _pruned("mistral", uniform=False, head_granularity="query_head")
    widths = [layer.widths() for layer in discover(model)]
    assert widths[1]["num_key_value_heads"] == 4 and widths[1]["num_attention_heads"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "out"), attn_implementation="eager")
    assert reloaded.model.layers[1].self_attn.num_key_value_groups == 1
    assert reloaded.model.layers[0].self_attn.num_key_value_groups == 2
    ids = batch()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(reloaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow  # a second Python process
def test_heterogeneous_checkpoint_loads_without_hfprune_via_remote_code(tmp_path):
    model = _pruned("qwen2", uniform=False)
    out = save_pruned(model, tmp_path / "out")
    ids = batch()
    fake = tmp_path / "no_hfprune" / "hfprune"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hfprune is not installed here')\n")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(fake.parent)!r})
        try:
            import hfprune
        except ImportError:
            pass
        else:
            raise SystemExit("hfprune was importable")
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(out)!r})
        except ValueError as error:
            assert "trust_remote_code" in str(error)
        else:
            raise SystemExit("loaded custom code without trust_remote_code")
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, attn_implementation="eager")
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        with open({str(tmp_path / "logits.json")!r}, "w") as f:
            json.dump(logits.tolist(), f)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.tensor(json.loads((tmp_path / "logits.json").read_text()))
    torch.testing.assert_close(logits, _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a second Python process
def test_deferred_registration_imports_nothing_and_loads_after_transformers(tmp_path):
    """The line hfprune/__init__.py runs: no transformers import at `import hfprune`, plain from_pretrained later."""
    out = save_pruned(_pruned("llama", uniform=False), tmp_path / "out")
    script = textwrap.dedent(
        f"""
        import sys
        import hfprune
        from hfprune.export.registration import register_auto_classes
        register_auto_classes(defer=True)
        assert "transformers" not in sys.modules and "torch" not in sys.modules, "defer=True imported them"
        from transformers import LlamaForCausalLM  # imports the Auto modules half-way through its own import
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        print("CLASS", type(model).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CLASS HfpruneLlamaForCausalLM" in result.stdout


def test_heterogeneous_checkpoint_loads_in_8bit_and_generates(tmp_path):
    model = _pruned("llama", uniform=False)
    out = save_pruned(model, tmp_path / "out")
    ids = batch()[:1, :5]
    for device_map in ("cpu", "auto"):
        quantized = AutoModelForCausalLM.from_pretrained(
            out, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=device_map
        )
        layer = quantized.model.layers[1]
        assert type(layer.mlp.gate_proj).__name__ == "Linear8bitLt"
        assert tuple(layer.mlp.gate_proj.weight.shape) == tuple(model.model.layers[1].mlp.gate_proj.weight.shape)
        with torch.no_grad():
            generated = quantized.generate(ids, max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 9)


def test_reexport_of_a_loaded_pruned_checkpoint_is_identical(tmp_path):
    first = save_pruned(_pruned("gemma2", uniform=False), tmp_path / "first")
    second = save_pruned(AutoModelForCausalLM.from_pretrained(first), tmp_path / "second")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_tied_embeddings_stay_tied(streamed, tmp_path):
    original = tiny_model("llama", tie_word_embeddings=True)
    original.save_pretrained(tmp_path / "original")
    model = copy.deepcopy(original).requires_grad_(False)  # frozen: re-read from the original when streamed
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure, PruningConfig(importance="magnitude", target_sparsity=0.3, protected_layers=(0,)))
    remove_pruned_groups(structure, masks)
    out = save_pruned(model, tmp_path / "out", masks=masks,
                      original_checkpoint=tmp_path / "original" if streamed else None)
    assert "lm_head.weight" not in _load_weights(out)
    report = json.loads((out / "pruning_report.json").read_text())["export"]
    assert report["tensors_from_original"] == (len(_load_weights(out)) if streamed else 0)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(model, batch()), atol=1e-5, rtol=1e-5)


# ---- streaming from the original checkpoint, 8-bit base + LoRA ----------------------------------------


def test_streamed_export_of_8bit_lora_model_equals_full_precision_merge(tmp_path):
    from peft import LoraConfig, get_peft_model

    original_dir = tmp_path / "original"
    tiny_model("qwen2").save_pretrained(original_dir, max_shard_size="20KB")  # qwen2: q/k/v biases too
    assert len(list(original_dir.glob("*.safetensors"))) > 5
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS)

    quantized = AutoModelForCausalLM.from_pretrained(
        original_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    peft_model = get_peft_model(quantized, lora_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # B starts at zero; make the merge matter
    lora_weights = {name: p.detach().clone() for name, p in peft_model.named_parameters() if "lora_" in name}
    config = PruningConfig(importance="random", target_sparsity=0.4, protected_layers=(0,))
    structure = discover(peft_model, protected_layers=config.protected_layers)
    masks = _masks(structure, config)
    remove_pruned_groups(structure, masks)
    streamed = save_pruned(peft_model, tmp_path / "streamed", masks=masks, original_checkpoint=original_dir,
                           max_shard_size="20KB")

    # Reference: the full-precision original, the same LoRA weights merged, then pruned with the same masks.
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32), lora_config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(lora_weights[name])
    merged = reference.merge_and_unload()
    remove_pruned_groups(discover(merged, protected_layers=()), masks)
    in_memory = save_pruned(merged, tmp_path / "in_memory", masks=masks)

    assert (streamed / "model.safetensors.index.json").is_file()
    ours, expected = _load_weights(streamed), _load_weights(in_memory)
    assert ours.keys() == expected.keys()
    different = [name for name in ours if not torch.equal(ours[name], expected[name])]
    assert not different, f"not bit-identical: {different}"
    report = json.loads((streamed / "pruning_report.json").read_text())
    assert report["export"]["streamed_from_original"] and report["export"]["lora_merged_tensors"] == 7 * 4
    assert report["base_model"] == str(original_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed)
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(merged, batch()), atol=1e-5, rtol=1e-5)


def test_frozen_weights_that_differ_from_the_original_are_refused(tmp_path):
    """E.g. LoRA merged with merge_and_unload() before the export: re-reading the original would drop it."""
    tiny_model("llama").save_pretrained(tmp_path / "original")
    model = tiny_model("llama").requires_grad_(False)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3] += 0.05
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight is frozen in memory but differs"):
        save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "original")
    assert not (tmp_path / "out").exists()


def test_original_checkpoint_as_hub_id_is_downloaded_without_pickles(local_hub, tmp_path):
    from huggingface_hub import HfApi

    original = tmp_path / "original"
    tiny_model("mistral").save_pretrained(original, max_shard_size="40KB")
    (original / "training_args.bin").write_bytes(b"not even looked at")
    api = HfApi()
    repo_id = api.create_repo("tiny-mistral").repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=original).oid
    model = tiny_model("mistral").requires_grad_(False)
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure, PruningConfig(importance="magnitude", target_sparsity=0.5, protected_layers=(0,)))
    remove_pruned_groups(structure, masks)

    out = save_pruned(model, tmp_path / "out", masks=masks, original_checkpoint=repo_id)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["base_model"] == repo_id and report["base_model_revision"] == commit
    assert report["export"]["tensors_from_original"] == len(_load_weights(out))
    assert not local_hub.requests_to("training_args.bin", method="GET")  # never fetched (so never refused either)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), batch()), _logits(model, batch()),
                               atol=1e-5, rtol=1e-5)


def test_modules_to_save_copy_is_exported_from_memory_even_when_streaming(tmp_path):
    """A trained `modules_to_save` copy (here lm_head) wins over the original checkpoint's tensor."""
    from peft import LoraConfig, get_peft_model

    tiny_model("llama").save_pretrained(tmp_path / "original")
    lora_config = LoraConfig(r=4, target_modules=PROJECTIONS, modules_to_save=["lm_head"])
    model = get_peft_model(tiny_model("llama"), lora_config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(0.5)  # "trained"
    model.requires_grad_(False)  # as after training: nothing says it was trained but the wrapper
    out = save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "original")
    exported = _load_weights(out)["lm_head.weight"]
    assert torch.equal(exported, model.base_model.model.lm_head.modules_to_save["default"].weight)
    assert not any(".modules_to_save." in name or "original_module" in name for name in _load_weights(out))


def test_uniform_false_writes_the_heterogeneous_format_for_a_uniform_model(tmp_path):
    model = _pruned("qwen3", uniform=True)
    out = save_pruned(model, tmp_path / "out", uniform=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hfprune_qwen3" and sorted(config["per_layer_config"]) == ["0", "1", "2", "3"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(model, batch()), atol=1e-5, rtol=1e-5)


def test_8bit_model_without_original_checkpoint_is_refused(tmp_path):
    original_dir = tmp_path / "original"
    tiny_model("llama").save_pretrained(original_dir)
    quantized = AutoModelForCausalLM.from_pretrained(
        original_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    quantized.config._name_or_path = ""
    with pytest.raises(ValueError, match="in memory: pass original_checkpoint="):
        save_pruned(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pruned_model_streamed_without_masks_is_refused(tmp_path):
    """A model pruned by other means (no removal record attached, no masks given) cannot be sliced."""
    from hfprune.removal import ATTRIBUTE

    tiny_model("llama").save_pretrained(tmp_path / "original")
    model = _pruned("llama", uniform=False)
    delattr(model, ATTRIBUTE)
    with pytest.raises(ValueError, match="the model is pruned but masks=None"):
        save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "original")


def test_one_shot_pruned_model_streams_from_the_original_with_its_attached_record(tmp_path):
    """prune_model attaches the removal masks: save_pruned needs no masks= to slice the original."""
    original = tiny_model("llama")
    original.save_pretrained(tmp_path / "original")
    model = _pruned("llama", uniform=False).requires_grad_(False)  # frozen: streamed from the original
    out = save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "original")
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["export"]["tensors_from_original"] > 0 and report["layers"][1]["kept_channels"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(model, batch()), atol=1e-5, rtol=1e-5)


# ---- report, config choices ------------------------------------------------------------------------------


def test_report_counts_parameters_and_original_indices(tmp_path):
    model = tiny_model("llama")
    before = count_parameters(model)
    config = PruningConfig(importance="magnitude", target_sparsity=0.4, protected_layers=(0,),
                           head_granularity="kv_group")
    structure = discover(model, protected_layers=config.protected_layers)
    masks = _masks(structure, config)
    remove_pruned_groups(structure, masks)
    given = {"importance": "magnitude", "parameters": {"note": "x"}}
    out = save_pruned(model, tmp_path / "out", masks=masks, report=given)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["importance"] == "magnitude" and report["parameters"]["note"] == "x"
    assert report["parameters"]["before"] == before
    assert report["parameters"]["after"] == count_parameters(model)
    assert report["format"] == "heterogeneous"
    for entry in report["layers"]:
        mask = masks[entry["index"]]
        assert entry["kept_query_heads"] == mask.heads.nonzero().squeeze(1).tolist()
        assert entry["kept_kv_groups"] == mask.kv_groups(2).nonzero().squeeze(1).tolist()
        assert entry["kept_channels"] == mask.channels.nonzero().squeeze(1).tolist()
        assert entry["original"] == {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 96}


def test_uniform_true_on_a_heterogeneous_model_names_the_widths(tmp_path):
    model = _pruned("llama", uniform=False)
    with pytest.raises(ValueError, match=r"uniform=True: the decoder layers have different widths \(layer 0: "
                                         r"num_attention_heads=8, num_key_value_heads=2, intermediate_size=96; "
                                         r"layers \[1, 2, 3\]"):
        save_pruned(model, tmp_path / "out", uniform=True)
    assert not (tmp_path / "out").exists()


def test_uniform_widths_a_stock_config_rejects_list_the_valid_ones(tmp_path):
    model = tiny_model("llama_mha")
    structure = discover(model, protected_layers=())
    masks = _masks(structure, PruningConfig(importance="magnitude", head_sparsity=0.25, structures=("heads",),
                                            protected_layers=(), head_granularity="kv_group"))
    remove_pruned_groups(structure, masks)  # 3 of 4 heads everywhere; 64 % 3 != 0
    with pytest.raises(ValueError, match=r"stock llama config rejects the uniform widths num_attention_heads=3.*"
                                         r"hidden size \(64\) is not a multiple.*accepts num_attention_heads in "
                                         r"\[1, 2, 4\]"):
        save_pruned(model, tmp_path / "out", uniform=True)
    out = save_pruned(model, tmp_path / "out")  # uniform=None falls back to the heterogeneous format
    assert json.loads((out / "config.json").read_text())["model_type"] == "hfprune_llama"
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager"), batch()),
                               _logits(model, batch()), atol=1e-5, rtol=1e-5)


def test_tokenizer_and_generation_config_are_saved(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0")
    out = save_pruned(_pruned("llama", uniform=False), tmp_path / "out", tokenizer=tokenizer)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    check_no_pickles(out)


# ---- safety: pickles, atomic writes, contradictions -------------------------------------------------------


def _evil_pickle(path: Path, sentinel: Path) -> None:
    """Protocol-0 bytes that would create `sentinel` if anyone unpickled them (written as bytes, not pickled)."""
    path.write_bytes(f"cbuiltins\nopen\n(S'{sentinel}'\nS'w'\ntR.".encode())


def test_checkpoint_with_a_pickle_is_refused_and_never_unpickled(tmp_path):
    original = tmp_path / "original"
    tiny_model("llama").save_pretrained(original)
    sentinel = tmp_path / "unpickled"
    _evil_pickle(original / "pytorch_model.bin", sentinel)
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin.*never loads pickles"):
        save_pruned(tiny_model("llama"), tmp_path / "out", original_checkpoint=original)
    assert not sentinel.exists() and not (tmp_path / "out").exists()

    (original / "pytorch_model.bin").unlink()
    check_no_pickles(original)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001.pt"}}
    (original / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PickleCheckpointError, match=r"references non-safetensors weight files \['model-00001.pt'\]"):
        check_no_pickles(original)


def test_existing_output_dir_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = _pruned("llama", uniform=False)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_pruned(model, out)
    assert (out / "stale.txt").read_text() == "old"
    save_pruned(model, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_crash_mid_write_leaves_no_partial_output(tmp_path, monkeypatch):
    from hfprune.export import shards

    model = _pruned("llama", uniform=False)
    old = save_pruned(model, tmp_path / "old")
    old_bytes = {p.name: p.read_bytes() for p in old.iterdir()}

    def crash(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards.ShardWriter, "flush", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, old, overwrite=True)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_config_contradicting_the_weights_is_named(tmp_path):
    out = save_pruned(_pruned("llama", uniform=False), tmp_path / "out")
    validate_checkpoint_shapes(out)
    config = json.loads((out / "config.json").read_text())
    config["per_layer_config"]["2"]["intermediate_size"] = 40
    (out / "config.json").write_text(json.dumps(config))
    message = (r"layer 2: tensor model\.layers\.2\.mlp\.gate_proj\.weight has shape \[\d+, 64\] but config.json says "
               r".*intermediate_size=40.*per_layer_config\[2\]")
    with pytest.raises(ValueError, match=message):
        validate_checkpoint_shapes(out)
