"""The memory estimator and the shipped model configs (fast: configs, meta device, one tiny model)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hfprune.estimate import (
    MODEL_CONFIG_DIR,
    PERSISTENT,
    GiB,
    MemoryEstimate,
    available_model_configs,
    compare_criteria,
    estimate_memory,
    load_model_config,
)
from hfprune.importance import available_importances, get_importance
from hfprune.structure import PROJECTION_ROLES as PROJECTIONS
from hfprune.structure import discover

# Published sizes (model cards / papers).
PUBLISHED_PARAMETERS = {
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "llama-30b": 32.5e9,
    "llama-65b": 65.2e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "llama-3-8b": 8.03e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
    "llama-3.1-70b": 70.6e9,
    "mistral-7b": 7.24e9,
    "qwen2.5-7b": 7.61e9,
    "qwen3-8b": 8.2e9,
    "gemma-2-9b": 9.24e9,
    "smollm2-135m": 135e6,
}


def meta_parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_every_published_model_has_a_config():
    assert set(available_model_configs()) == set(PUBLISHED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_config_loads_and_has_the_published_size(name):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(MODEL_CONFIG_DIR / f"{name}.json"))
    count = meta_parameter_count(config)
    assert count == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.02)
    # the estimator counts the same parameters from the config alone
    assert estimate_memory(config).num_parameters == count


def test_config_details():
    llama2_70b = load_model_config("llama-2-70b")
    assert (llama2_70b.num_key_value_heads, llama2_70b.intermediate_size) == (8, 28672)
    llama31 = load_model_config("llama-3.1-8b")
    assert llama31.rope_parameters["rope_type"] == "llama3"
    assert llama31.rope_parameters["factor"] == 8.0
    assert llama31.rope_parameters["rope_theta"] == 500000.0
    assert load_model_config("llama-3-8b").rope_parameters["rope_type"] == "default"
    assert load_model_config("mistral-7b").sliding_window == 4096
    qwen = load_model_config("qwen2.5-7b")
    assert (qwen.vocab_size, qwen.num_key_value_heads) == (152064, 4)
    gemma = load_model_config("gemma-2-9b")
    assert (gemma.head_dim, gemma.final_logit_softcapping, gemma.query_pre_attn_scalar) == (256, 30.0, 256)
    smol = load_model_config("smollm2-135m")
    assert smol.tie_word_embeddings and (smol.num_attention_heads, smol.num_key_value_heads) == (9, 3)


def test_load_model_config_accepts_names_paths_dicts_and_configs(tmp_path):
    by_name = load_model_config("llama-7b")
    assert by_name.hidden_size == 4096 and by_name.name_or_path == "llama-7b"
    assert load_model_config("LLaMA-7B.json").hidden_size == 4096
    path = MODEL_CONFIG_DIR / "llama-7b.json"
    assert load_model_config(path).hidden_size == 4096
    shutil.copy(path, tmp_path / "config.json")
    assert load_model_config(tmp_path).hidden_size == 4096
    as_dict = json.loads(path.read_text())
    assert load_model_config(as_dict).intermediate_size == 11008
    assert load_model_config(by_name) is by_name
    with pytest.raises(ValueError, match="llama-8b.*llama-65b"):
        load_model_config("llama-8b")


def test_components_add_up():
    estimate = estimate_memory("llama-13b", gradient_checkpointing=False)
    assert estimate.total == sum(estimate.phases[estimate.peak_phase].values())
    assert estimate.total == max(sum(parts.values()) for parts in estimate.phases.values())
    for parts in estimate.phases.values():
        for name in PERSISTENT:  # weights and optimizer states are alive in every phase
            assert parts[name] == estimate.components[name]
        for name, value in parts.items():
            assert 0 <= value <= estimate.components[name]
    assert estimate.total <= sum(estimate.components.values())
    assert 0 < estimate.total < estimate.num_parameters * 2  # far below a bf16 copy of the weights


def test_8bit_weights_are_int8_plus_row_scales():
    config = load_model_config("llama-7b")
    estimate = estimate_memory(config, load_in_8bit=True)
    h, inter, n_layers = 4096, 11008, 32
    projections = n_layers * (4 * h * h + 3 * h * inter)
    rows = n_layers * (4 * h + 2 * inter + h)
    assert estimate.components["base_weights"] == projections + 4 * rows
    # embeddings and LM head are not quantised (fp32 after prepare_model_for_kbit_training)
    assert estimate.components["other_weights"] == 4 * (2 * 32000 * h + (2 * n_layers + 1) * h)


def test_llama_activation_formula():
    t, h, inter, r, heads = 512, 4096, 11008, 8, 32
    estimate = estimate_memory("llama-7b", gradient_checkpointing=False, lora_r=r)
    per_layer = t * (4 * h + 2 * h + 2 * h + 4 * inter + 7 * r) * 4 + t * heads * 4 + 2 * t * 4
    outside = 2 * t * 128 * 4 + t * h * 4 + t * 4 + 8 * t  # cos/sin, final norm, labels
    assert estimate.components["saved_activations"] == 32 * per_layer + outside
    checkpointed = estimate_memory("llama-7b", gradient_checkpointing=True, lora_r=r)
    assert checkpointed.components["saved_activations"] == 32 * t * h * 4 + outside


def test_llama_65b_lora_8bit_fits_on_one_80gb_gpu():
    estimate = estimate_memory("llama-65b", criterion="lora", load_in_8bit=True, seq_len=512, batch_size=1,
                               gradient_checkpointing=True)
    assert estimate.total < 80 * GiB
    assert estimate.fits(80e9)  # with 1 GiB of CUDA context and 5% allocator slack
    assert not estimate.fits(40e9)
    assert not compare_criteria("llama-65b")["taylor (bf16)"].fits(80e9)


def test_full_gradient_criteria_refuse_an_8bit_base():
    for criterion in ("taylor", "taylor2", "param_second", "vector"):
        with pytest.raises(ValueError, match=rf"criterion='{criterion}'.*load_in_8bit=True.*full.*gradient"):
            estimate_memory("llama-7b", criterion=criterion, load_in_8bit=True)
    dense = estimate_memory("llama-7b", criterion="taylor", load_in_8bit=False)
    assert dense.components["weight_gradients"] >= 6.7e9 * 2  # one bf16 gradient per weight
    fisher = estimate_memory("llama-7b", criterion="taylor2", load_in_8bit=False)
    assert fisher.total > dense.total


def test_a_criterion_with_its_own_forward_passes_costs_one_no_grad_pass():
    """bonsai scores in prune_model with no-grad forward passes: no gradient, no optimizer, no saved activation;
    the 8-bit base by default; param_second keeps a Fisher diagonal like taylor2."""
    bonsai = estimate_memory("llama-7b", criterion="bonsai", seq_len=512, batch_size=1)
    lora = estimate_memory("llama-7b", criterion="lora", seq_len=512, batch_size=1)
    assert bonsai.settings["load_in_8bit"] and list(bonsai.phases) == ["forward passes (no grad)"]
    assert not {"optimizer_states", "weight_gradients", "lora_gradients", "saved_activations"} & set(bonsai.components)
    assert bonsai.components["base_weights"] == lora.components["base_weights"]
    assert bonsai.components["forward_loss_buffers"] == 512 * 32000 * (4 + 2 * 4)  # fp32 activations (8-bit base)
    assert bonsai.total == sum(bonsai.components.values()) < lora.total
    assert any("prune_model" in note for note in bonsai.notes)
    fisher = estimate_memory("llama-7b", criterion="param_second", load_in_8bit=False)
    taylor2 = estimate_memory("llama-7b", criterion="taylor2", load_in_8bit=False)
    assert fisher.components["score_buffers"] == taylor2.components["score_buffers"]
    assert fisher.components["importance_workspace"] < taylor2.components["importance_workspace"]


def test_grows_with_seq_len_and_shrinks_with_checkpointing():
    for checkpointing in (True, False):
        short = estimate_memory("llama-7b", seq_len=512, gradient_checkpointing=checkpointing)
        long = estimate_memory("llama-7b", seq_len=2048, gradient_checkpointing=checkpointing)
        assert long.total > short.total
        assert long.components["saved_activations"] > short.components["saved_activations"]
    for criterion, eight_bit in (("lora", True), ("taylor", False)):
        on = estimate_memory("llama-7b", criterion=criterion, load_in_8bit=eight_bit, seq_len=2048,
                             gradient_checkpointing=True)
        off = estimate_memory("llama-7b", criterion=criterion, load_in_8bit=eight_bit, seq_len=2048,
                              gradient_checkpointing=False)
        assert on.components["saved_activations"] < off.components["saved_activations"]
        assert on.total <= off.total
        if criterion == "lora":
            assert on.total < off.total
        else:  # the full gradients, not the activations, make Taylor's peak
            assert on.peak_phase == off.peak_phase == "importance scoring"
    assert estimate_memory("llama-7b", batch_size=4).total > estimate_memory("llama-7b", batch_size=1).total


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 0}, r"seq_len=0: must be a positive integer"),
        ({"batch_size": -1}, r"batch_size=-1: must be a positive integer"),
        ({"criterion": "fisher"}, r"criterion='fisher': must be one of \[.*'activation_taylor'.*'lora'.*'taylor'"),
        ({"compute_dtype": "int4"}, r"compute_dtype='int4': must be one of \['bfloat16', 'float16', 'float32'\]"),
        ({"optimizer": "adam"}, r"optimizer='adam': must be one of \['adamw'"),
        ({"lora_target_modules": ("q_proj", "qkv")}, r"\['qkv'\] not among \['q_proj'"),
        ({"lora_r": -2}, r"lora_r=-2: must be an integer >= 0"),
        ({"lora_r": 0}, r"criterion='lora' with lora_r=0"),
        ({"attn_implementation": "flash"}, r"attn_implementation='flash': must be one of \['sdpa', 'eager'\]"),
    ],
)
def test_bad_inputs_name_the_value_and_the_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("smollm2-135m", **kwargs)


def test_every_criterion_and_architecture_estimates():
    for criterion in available_importances():
        eight_bit = not get_importance(criterion).needs_weight_gradients
        assert estimate_memory("smollm2-135m", criterion=criterion, load_in_8bit=eight_bit).total > 0
    gemma = estimate_memory("gemma-2-9b", gradient_checkpointing=False)
    assert gemma.settings["attn_implementation"] == "eager"  # SDPA refuses softcapping
    sdpa = estimate_memory("gemma-2-9b", gradient_checkpointing=False, attn_implementation="sdpa")
    assert gemma.components["saved_activations"] > sdpa.components["saved_activations"]
    qwen3 = estimate_memory("qwen3-8b")
    assert qwen3.num_parameters == pytest.approx(8.19e9, rel=0.01)


def test_pruned_per_layer_config_is_smaller():
    from transformers import LlamaConfig

    base = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    full = LlamaConfig(**base)
    pruned = LlamaConfig(**base, per_layer_config={1: {"intermediate_size": 256, "num_key_value_heads": 1}})
    assert estimate_memory(pruned).num_parameters < estimate_memory(full).num_parameters
    assert estimate_memory(pruned).total < estimate_memory(full).total


def test_compare_criteria_and_report():
    row = compare_criteria("llama-7b")
    assert list(row) == ["lora (8-bit)", "taylor (bf16)"]
    assert row["lora (8-bit)"].total < row["taylor (bf16)"].total
    text = str(row["lora (8-bit)"])
    assert text == row["lora (8-bit)"].to_markdown()
    assert "GiB" in text and "(peak)" in text and "llama-7b" in text
    with pytest.raises(ValueError, match="criterion"):
        compare_criteria("llama-7b", criterion="lora")
    assert isinstance(row["taylor (bf16)"], MemoryEstimate)


def _count_saved_activations(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_formula_matches_the_tensors_autograd_saves(dtype):
    """Dense model, every weight trainable (the Taylor setting): formula == tensors saved for backward."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).train()
    seq_len = 64
    counted = _count_saved_activations(model, torch.randint(0, 300, (1, seq_len)))
    estimate = estimate_memory(config, criterion="taylor", load_in_8bit=False, seq_len=seq_len, lora_r=0,
                               gradient_checkpointing=False, compute_dtype=dtype, optimizer=None)
    log_softmax = 4 * seq_len * 300  # counted by the hooks, part of the estimator's loss buffers
    assert estimate.components["saved_activations"] + log_softmax == pytest.approx(counted, rel=0.001)


def test_activation_formula_matches_an_8bit_lora_model(tmp_path):
    """int8 base (bitsandbytes on the CPU) + LoRA on the 7 projections, prepared as for k-bit training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(PROJECTIONS), lora_dropout=0.0)).train()
    seq_len = 64
    counted = _count_saved_activations(model, torch.randint(0, 300, (1, seq_len)))
    estimate = estimate_memory(config, criterion="lora", load_in_8bit=True, seq_len=seq_len, lora_r=8,
                               gradient_checkpointing=False, compute_dtype="float32")
    # the first layer's input norm keeps nothing: the frozen embedding's output needs no gradient
    first_norm = 4 * seq_len * 64 + 4 * seq_len
    log_softmax = 4 * seq_len * 300
    assert estimate.components["saved_activations"] - first_norm + log_softmax == pytest.approx(counted, rel=0.001)
    # Linear8bitLt keeps the int8 matrix and one fp32 scale per output row (moved to .state by the forward)
    import bitsandbytes as bnb

    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 2 * 7
    assert all(m.weight.dtype == torch.int8 for m in int8)
    stored = sum(m.weight.untyped_storage().nbytes() + m.state.SCB.untyped_storage().nbytes() for m in int8)
    assert stored == estimate.components["base_weights"]


# ---- the criterion's cost comes from the registry ---------------------------------------------------------


@pytest.fixture
def registered(monkeypatch):
    """Register criteria for one test only (the registry is restored afterwards)."""
    from hfprune.importance import ImportanceCriterion, base, register_importance

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    def register(name, **declared):
        cls = type(name, (ImportanceCriterion,), {"name": name, **declared})
        register_importance(name)(cls)
        return cls

    return register


LLAMA_7B_PROJECTIONS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_a_registered_criterion_is_estimated_from_what_it_declares(registered):
    registered("costly", needs="nothing", work_buffers=5, weight_state_buffers=2)
    plain = estimate_memory("llama-7b", criterion="magnitude")  # needs nothing, one work buffer
    costly = estimate_memory("llama-7b", criterion="costly")
    assert costly.components["importance_workspace"] == 5 * 11008 * 4096 * 4  # fp32, the largest projection
    assert plain.components["importance_workspace"] == 1 * 11008 * 4096 * 4
    # two buffers the size of every scored weight, in the weight dtype (bf16)
    assert costly.components["score_buffers"] - plain.components["score_buffers"] == 2 * LLAMA_7B_PROJECTIONS * 2
    assert costly.settings["load_in_8bit"]  # PruningTrainer's default for a criterion without weight gradients

    registered("from_lora", needs="lora_gradients", work_buffers=1)
    on_qv = estimate_memory("llama-7b", criterion="from_lora", lora_target_modules=("q_proj", "v_proj"))
    assert on_qv.components["importance_workspace"] == 4096 * 4096 * 4  # it scores the adapted modules only
    with pytest.raises(ValueError, match="criterion='from_lora' with lora_r=0"):
        estimate_memory("llama-7b", criterion="from_lora", lora_r=0)

    registered("gradients", needs="weight_gradients", work_buffers=2)
    with pytest.raises(ValueError, match=r"criterion='gradients' with load_in_8bit=True.*full gradients.*'costly'"):
        estimate_memory("llama-7b", criterion="gradients", load_in_8bit=True)
    dense = estimate_memory("llama-7b", criterion="gradients")  # the default base: bf16, as PruningTrainer loads it
    assert not dense.settings["load_in_8bit"]
    taylor = estimate_memory("llama-7b", criterion="taylor")
    assert dense.components == taylor.components and dense.total == taylor.total


def test_a_registered_criterion_in_estimate_help_and_in_the_plan(registered, capsys, tmp_path):
    from hfprune.cli import main
    from hfprune.plan import dry_run
    from hfprune.recipes import load_recipe

    registered("my_criterion", needs="forward")
    assert main(["estimate", "--help"]) == 0
    assert "my_criterion" in capsys.readouterr().out
    assert main(["estimate", "smollm2-135m", "--criterion", "my_criterion"]) == 0
    out = capsys.readouterr().out
    assert "criterion `my_criterion`, 8-bit base" in out and "Peak:" in out

    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct, model_config: smollm2-135m}\n"
                    "pruning: {target_sparsity: 0.2, importance: my_criterion}\n"
                    f"training: {{max_steps: 20, output_dir: {tmp_path / 'out'}}}\n")
    plan = dry_run(load_recipe(path, check_device=False))
    assert plan.memory and "criterion `my_criterion`" in plan.memory
    assert not [note for note in plan.notes if "memory estimate unavailable" in note]


QUALITY_RECIPES = sorted((MODEL_CONFIG_DIR.parent.parent / "recipes").glob("smollm2-135m-quality-*.yaml"))


@pytest.mark.parametrize("path", QUALITY_RECIPES, ids=lambda p: p.stem)
def test_activation_taylor_recipes_plan_with_a_memory_estimate(path):
    from hfprune.estimate import estimate_recipe
    from hfprune.plan import dry_run
    from hfprune.recipes import load_recipe

    recipe = load_recipe(path, check_device=False)
    assert recipe.pruning.importance == "activation_taylor"
    plan = dry_run(recipe)
    assert not [note for note in plan.notes if "memory estimate unavailable" in note]
    assert "criterion `activation_taylor`" in plan.memory
    # the plan measures the meta model it built: the same estimate as building the model again
    assert f"Peak: **{estimate_recipe(recipe).total_gib:.2f} GiB**" in plan.memory


def test_activation_probe_saves_what_o_proj_and_down_proj_pass_on():
    """activation_taylor's probe keeps the inputs of o_proj / down_proj for its backward: the same storage when
    the projection keeps its input anyway (LoRA on it), one T*I tensor per layer more when it does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfprune.structure import discover

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    seq_len, fp32 = 64, 4
    ids = torch.randint(0, 300, (1, seq_len), generator=torch.Generator().manual_seed(0))
    for targets in (list(PROJECTIONS), ["q_proj", "v_proj"]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.0)).train()
        without_probe = _count_saved_activations(model, ids)
        criterion = get_importance("activation_taylor")
        criterion.prepare(model, discover(model).layers)
        with_probe = _count_saved_activations(model, ids)
        criterion.release()
        settings = dict(load_in_8bit=False, seq_len=seq_len, lora_r=8, lora_target_modules=targets,
                        gradient_checkpointing=False, compute_dtype="float32")
        probed = estimate_memory(config, criterion="activation_taylor", **settings)
        plain = estimate_memory(config, criterion="magnitude", **settings)
        extra = with_probe - without_probe
        assert extra == probed.components["saved_activations"] - plain.components["saved_activations"]
        assert extra == (0 if "down_proj" in targets else 2 * seq_len * 160 * fp32)
        # and the formula is the count (the first norm keeps nothing: the frozen embedding needs no gradient)
        first_norm, log_softmax = fp32 * seq_len * 64 + fp32 * seq_len, fp32 * seq_len * 300
        assert probed.components["saved_activations"] - first_norm + log_softmax == pytest.approx(with_probe, rel=0.001)
    # the probe's statistics: float64 per feature of o_proj and down_proj, kept between scorings
    assert probed.components["score_buffers"] - plain.components["score_buffers"] == 2 * (64 + 160) * 16


# ---- shapes from discovery: pruned and heterogeneous models -----------------------------------------------


def test_a_heterogeneous_config_is_measured_layer_by_layer():
    from transformers import LlamaConfig

    from hfprune.estimate import model_shapes

    base = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    full = model_shapes(LlamaConfig(**base))
    pruned = model_shapes(LlamaConfig(**base, per_layer_config={1: {"intermediate_size": 256,
                                                                     "num_key_value_heads": 1}}))
    assert [(layer.kv_heads, layer.intermediate) for layer in pruned.layers] == [(2, 512), (1, 256), (2, 512), (2, 512)]
    removed = 256 * 3 * 256 + 2 * 64 * 256  # MLP channels (gate, up rows, down columns), one k and one v head
    assert full.num_parameters - pruned.num_parameters == removed
    assert pruned.layers[1].parameters == full.layers[1].parameters - removed


def test_a_pruned_model_and_its_exported_checkpoint_estimate_alike(tmp_path):
    from hfprune import PruningConfig, prune_model
    from hfprune.estimate import model_shapes
    from hfprune.export import save_pruned

    from .tiny_models import tiny_model

    model = prune_model(tiny_model("llama"), PruningConfig(target_sparsity=0.4, importance="magnitude",
                                                           protected_layers=(0,)))
    save_pruned(model, tmp_path / "pruned", dtype=torch.float32)
    exported = load_model_config(tmp_path / "pruned")
    assert exported.model_type == "hfprune_llama"  # heterogeneous: per_layer_config + shipped modeling code
    in_memory, from_config = model_shapes(model), model_shapes(exported)
    assert from_config.layers == in_memory.layers and len({layer.intermediate for layer in in_memory.layers}) > 1
    assert from_config.num_parameters == in_memory.num_parameters == sum(p.numel() for p in model.parameters())
    # (the tiny model runs eager attention, a config loads with the default: compare one kind)
    settings = dict(criterion="activation_taylor", seq_len=32, gradient_checkpointing=False, attn_implementation="sdpa")
    assert estimate_memory(model, **settings).phases == estimate_memory(exported, **settings).phases


# ---- a recipe given to estimate --------------------------------------------------------------------------


def test_a_recipe_is_estimated_as_it_will_run(tmp_path, capsys):
    from hfprune.cli import main
    from hfprune.estimate import estimate_recipe, recipe_settings
    from hfprune.recipes import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct, model_config: smollm2-135m}\n"
        "lora: {r: 4, lora_dropout: 0.1, target_modules: [q_proj, v_proj, down_proj]}\n"
        "pruning: {target_sparsity: 0.2, importance: activation_taylor}\n"
        "data: {max_length: 256}\n"
        f"training: {{max_steps: 20, per_device_train_batch_size: 2, gradient_checkpointing: false, "
        f"optim: adamw_bnb_8bit, output_dir: {tmp_path / 'out'}}}\n"
    )
    recipe = load_recipe(path, check_device=False)
    assert recipe_settings(recipe) == {
        "criterion": "activation_taylor", "load_in_8bit": True, "load_in_4bit": False, "seq_len": 256,
        "batch_size": 2, "gradient_checkpointing": False, "compute_dtype": "bfloat16", "optimizer": "adamw_8bit",
        "lora_r": 4, "lora_target_modules": ("q_proj", "v_proj", "down_proj"), "lora_dropout": 0.1,
        "compensation": "auto", "protected_layers": None,
    }
    expected = estimate_recipe(recipe)
    assert expected.components == estimate_memory(
        "smollm2-135m", criterion="activation_taylor", seq_len=256, batch_size=2, lora_r=4,
        lora_target_modules=("q_proj", "v_proj", "down_proj"), lora_dropout=0.1, gradient_checkpointing=False,
        optimizer="adamw_8bit").components
    assert main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"Peak: **{expected.total_gib:.2f} GiB**" in out and "seq 256 x batch 2, LoRA r=4" in out
    assert main(["estimate", str(path), "--seq-len", "128", "--load-in-4bit"]) == 0  # flags override the recipe
    out = capsys.readouterr().out
    assert "criterion `activation_taylor`, 4-bit base, seq 128 x batch 2" in out


def test_the_shipped_65b_recipe_estimates_through_the_cli(capsys):
    from hfprune.cli import main
    from hfprune.estimate import estimate_recipe
    from hfprune.recipes import load_recipe

    path = MODEL_CONFIG_DIR.parent.parent / "recipes" / "llama-65b-20.yaml"
    expected = estimate_recipe(load_recipe(path, check_device=False))
    assert expected.settings["lora_dropout"] == 0.05 and expected.settings["load_in_8bit"]
    assert expected.fits(80e9)  # LoRAPrune's promise: 65B on one 80 GB card in 8-bit
    assert main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "**llama-65b**" in out and f"Peak: **{expected.total_gib:.2f} GiB**" in out


def test_compensation_grams_are_counted_as_the_engine_allocates_them():
    """The estimate's Gram bytes are what GramHooks holds after a forward pass over the prunable layers."""
    from hfprune.compensation import GramHooks
    from hfprune.compensator import gram_bytes

    from .tiny_models import tiny_model

    model = tiny_model("llama")
    structure = discover(model)
    hooks = GramHooks()
    hooks.prepare(model, structure.prunable_layers)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 8)))
    held = sum(g.gram.numel() * g.gram.element_size() + g.sums.numel() * g.sums.element_size()
               for g in hooks.grams.values())
    hooks.release()
    assert held == gram_bytes(structure.prunable_layers) > 0
    estimate = estimate_memory(model.config, criterion="activation_taylor")
    assert estimate.host_memory == {"compensation_grams": held}
    assert "compensation's Gram matrices" in estimate.to_markdown()
    # the peak itself is unchanged: the Grams live in host memory when the model is on a GPU
    none = estimate_memory(model.config, criterion="activation_taylor", compensation="none")
    assert none.host_memory == {} and none.total == estimate.total
    everything = estimate_memory(model.config, criterion="activation_taylor", protected_layers=[])
    assert everything.host_memory["compensation_grams"] == gram_bytes(structure.layers)


def test_the_65b_grams_are_what_the_design_notes_say():
    """LLaMA-65B: an 8192-wide o_proj input and a 22016-wide MLP per layer, 71 prunable layers of 80."""
    estimate = estimate_memory("llama-65b", criterion="lora", load_in_8bit=True)
    per_layer = 4 * 8192 ** 2 + 8 * 8192 + 4 * 22016 ** 2 + 8 * 22016
    assert estimate.host_memory["compensation_grams"] == per_layer * (80 - 9)


def test_a_bad_compensation_is_named():
    with pytest.raises(ValueError, match=r"compensation='ls': must be one of \['auto', 'least_squares', 'none'\]"):
        estimate_memory("llama-7b", compensation="ls")
