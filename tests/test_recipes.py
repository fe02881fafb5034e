"""Every shipped recipe loads, builds its config objects and dry-runs on the meta device; the loader's rules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hfprune.plan import dry_run
from hfprune.recipes import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# LoRAPrune's published settings; the smollm2 quality recipes are our own settings for a 2-core CPU.
LORAPRUNE = [p for p in RECIPES if (p.stem.endswith(("-20", "-50", "-ddp"))) and not p.stem.startswith("smollm2")]


@pytest.fixture(scope="module")
def plans():
    """Every recipe loaded and planned once; the timing covers all of them together."""
    start = time.perf_counter()
    results = {}
    for path in RECIPES:
        recipe = load_recipe(path, check_device=False)  # bf16 recipes are meant for GPUs
        results[path.name] = (recipe, dry_run(recipe, memory=False))
    return results, time.perf_counter() - start


def test_the_expected_recipes_exist():
    names = {p.stem for p in RECIPES}
    for size in ("7b", "13b", "30b", "65b"):
        assert {f"llama-{size}-20", f"llama-{size}-50"} <= names
    assert {
        "smollm2-135m-demo", "llama-2-7b-20", "llama-2-13b-20", "llama-2-70b-20", "llama-3-8b-20", "llama-3.1-8b-20",
        "llama-3.1-70b-20", "mistral-7b-20", "qwen2.5-7b-20", "qwen3-8b-20", "gemma-2-9b-20", "llama-2-7b-ddp",
        "smollm2-135m-quality-20", "smollm2-135m-quality-50",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_runs_to_its_target(path, plans):
    results, _ = plans
    recipe, plan = results[path.name]
    assert recipe.model.model_config, "every recipe names a model config for dry runs"
    assert plan.model == recipe.model.model_config
    assert abs(plan.reached_sparsity - recipe.pruning.target_sparsity) < 0.01
    assert plan.params_after < plan.params_before
    assert plan.params_before - plan.params_after == plan.removed_params
    assert plan.checkpoint["kind"] in ("uniform", "heterogeneous")
    assert plan.schedule["update_steps"], "the schedule updates the masks at least once"
    assert plan.schedule["progress"][-1] == 1.0
    protected = [layer for layer in plan.layers if layer.protected]
    assert all(layer.before == layer.after for layer in protected)
    assert any("physical removal ran on meta tensors" in note for note in plan.notes)


def test_all_recipes_plan_within_a_minute(plans):
    _, seconds = plans
    assert seconds < 60, f"planning every recipe took {seconds:.1f} s"


@pytest.mark.parametrize("path", LORAPRUNE, ids=lambda p: p.stem)
def test_published_recipes_use_loraprune_settings(path, plans):
    recipe, plan = plans[0][path.name]
    lora, pruning, args = recipe.lora, recipe.pruning, recipe.training
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.05)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert args.learning_rate == 1e-4 and args.num_train_epochs == 2
    world = 8 if path.stem.endswith("-ddp") else 1
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * world == 128
    assert (pruning.importance, pruning.schedule, pruning.prune_every, pruning.ema_decay) == ("lora", "cubic", 10, 0.9)
    assert (pruning.warmup_ratio, pruning.cooldown_ratio, pruning.pruning_fraction) == (0.1, 0.1, 1.0)
    assert pruning.protected_layers is None and pruning.ranking == "local"
    assert recipe.data.max_length == 512 and recipe.data.train_on_prompt
    text = path.read_text()
    assert text.startswith("#") and "Assumed" in text or "as recipes/" in text, "assumptions are stated at the top"


def test_large_models_are_planned_at_full_size(plans):
    results, _ = plans
    _, plan = results["llama-65b-50.yaml"]
    assert plan.num_layers == 80 and 65.0e9 < plan.params_before < 65.5e9
    middle = plan.layers[40]
    assert middle.before == {"num_attention_heads": 64, "num_key_value_heads": 64, "intermediate_size": 22016}
    assert middle.after == {"num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008}
    _, plan = results["llama-3.1-70b-20.yaml"]
    assert plan.num_layers == 80 and plan.layers[40].after["num_key_value_heads"] == 7  # one of 8 KV groups
    _, plan = results["qwen2.5-7b-20.yaml"]
    assert plan.layers[10].after["num_key_value_heads"] == 4 and plan.layers[10].after["num_attention_heads"] == 24


def test_demo_recipe_reads_the_shared_data(data_dir, monkeypatch):
    monkeypatch.delenv("HFPRUNE_DATA_DIR", raising=False)
    default = (ROOT.parent / "shared" / "data" / "alpaca_en_demo.json").resolve()
    if not default.exists():  # the data lives elsewhere on this machine: the default leads nowhere
        with pytest.raises(RecipeError, match="HFPRUNE_DATA_DIR is not set"):
            load_recipe(ROOT / "recipes" / "smollm2-135m-demo.yaml", check_device=False)
    else:
        recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-demo.yaml", check_device=False)
        assert recipe.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert recipe.model.load_in_8bit and recipe.pruning.target_sparsity == 0.2
        assert Path(recipe.data.train[0].path) == default
        assert [Path(p).name for p in recipe.eval.perplexity] == ["wiki_demo.txt", "c4_demo.jsonl"]
        assert recipe.eval.seq_len == 512 and recipe.eval.max_windows
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-demo.yaml", check_device=False)
    assert recipe.data.train[0].path == str(data_dir / "alpaca_en_demo.json")


# ---- the loader's rules ---------------------------------------------------------------------------------------


def _write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
model: {name_or_path: org/model, model_config: smollm2-135m}
pruning: {target_sparsity: 0.3}
training: {max_steps: 10}
"""


@pytest.mark.parametrize(
    "text, message",
    [
        ("pruning: {target_sparsty: 0.5}",
         "unknown key 'pruning.target_sparsty'; did you mean 'pruning.target_sparsity'?"),
        ("trainig: {max_steps: 1}", "unknown key 'trainig'; did you mean 'training'?"),
        ("training: {learnig_rate: 1.0e-4}", "did you mean 'training.learning_rate'?"),
        ("lora: {rank: 8}", "unknown key 'lora.rank'"),
        ("export: {overwrit: true}", "did you mean 'export.overwrite'?"),
        ("data: {train: [{path: a.json, wieght: 2}]}", "did you mean 'data.train[0].weight'?"),
    ],
)
def test_unknown_keys_name_the_closest_valid_key(tmp_path, text, message):
    import re

    # A repeated section replaces the one in BASE (YAML: the last key wins).
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(_write(tmp_path, BASE + text))


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning.target_sparsity=abc", "pruning.target_sparsity='abc': expected a number"),
        ("training.max_steps=1.5", "training.max_steps=1.5: expected an integer"),
        ("training.bf16=maybe", "training.bf16='maybe': expected true/false"),
        ("pruning.target_sparsity=1.5", r"target_sparsity=1.5: must be in \[0, 1\)"),
        ("pruning.target_sparsty=0.5", "did you mean 'pruning.target_sparsity'"),
        ("pruning", "expected KEY=VALUE"),
        ("data.max_length=short", "data.max_length='short': expected an integer"),
    ],
)
def test_bad_overrides_are_refused(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, BASE), [override])


def test_overrides_are_yaml_and_dotted(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, BASE + "data: {train: [a.json, b.json]}"),
        ["pruning.target_sparsity=0.5", "pruning.structures=[channels]", "training.learning_rate=3e-4",
         "data.train.1.weight=2", "data.train.0.weight=1", "lora.r=16"],
    )
    assert recipe.pruning.target_sparsity == 0.5 and recipe.pruning.structures == ("channels",)
    assert recipe.training.learning_rate == 3e-4  # "3e-4" is a string to PyYAML; the float field takes it
    assert [s.weight for s in recipe.data.train] == [1, 2]
    assert recipe.lora.r == 16


def test_relative_paths_resolve_against_the_recipe_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub", BASE + "data: {train: ../data/a.jsonl}\neval: {perplexity: [wikitext2, w.txt]}")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.data.train[0].path == str(tmp_path / "data" / "a.jsonl")
    assert recipe.data.train[0].local
    assert recipe.eval.perplexity == ["wikitext2", str(tmp_path / "sub" / "w.txt")]
    hub = load_recipe(path, ["data.train=yahma/alpaca-cleaned"])
    assert (hub.data.train[0].path, hub.data.train[0].local) == ("yahma/alpaca-cleaned", False)
    assert recipe.export.output_dir == "outputs/recipe/model"  # outputs are relative to the cwd


def test_environment_variables_in_strings(tmp_path, monkeypatch):
    path = _write(tmp_path, BASE + "data: {train: '${MY_DATA:-/default}/a.json'}\nhub: {repo_id: '${USER_NS}/x'}")
    monkeypatch.delenv("MY_DATA", raising=False)
    monkeypatch.setenv("USER_NS", "me")
    recipe = load_recipe(path)
    assert recipe.data.train[0].path == "/default/a.json" and recipe.hub.repo_id == "me/x"
    monkeypatch.setenv("MY_DATA", "/elsewhere")
    assert load_recipe(path).data.train[0].path == "/elsewhere/a.json"
    monkeypatch.delenv("USER_NS")
    with pytest.raises(RecipeError, match="environment variable USER_NS is not set"):
        load_recipe(path)


def test_full_gradient_criterion_on_8bit_base_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="load_in_8bit=true with pruning.importance='taylor'"):
        load_recipe(_write(tmp_path, BASE), ["model.load_in_8bit=true", "pruning.importance=taylor"])


def test_lora_not_covering_the_scored_projections_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"importance='lora' reads the LoRA factors.*\['k_proj', 'o_proj'"):
        load_recipe(_write(tmp_path, BASE + "lora: {target_modules: [q_proj, v_proj, gate_proj, up_proj, down_proj]}"),
                    ["pruning.importance=lora"])
    assert load_recipe(_write(tmp_path, BASE + "lora: {target_modules: all-linear}")).lora is not None


def test_sparsity_outside_the_unit_interval_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"target_sparsity=1.0: must be in \[0, 1\)"):
        load_recipe(_write(tmp_path, BASE), ["pruning.target_sparsity=1.0"])


def test_bf16_without_a_gpu_is_named_unless_planning(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _write(tmp_path, BASE + "training: {bf16: true}\nmodel: {name_or_path: org/m}")
    with pytest.raises(RecipeError, match="training.bf16=true needs a GPU"):
        load_recipe(path)
    assert load_recipe(path, check_device=False).training.bf16


def test_model_section_is_required(tmp_path):
    with pytest.raises(RecipeError, match="the 'model' section is required"):
        load_recipe(_write(tmp_path, "pruning: {target_sparsity: 0.2}"))
    with pytest.raises(RecipeError, match="model.name_or_path is required"):
        load_recipe(_write(tmp_path, "model: {revision: main}"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_recipe(_write(tmp_path, "model:\n  name_or_path: [unclosed\n"))


def test_dora_is_refused_for_the_lora_criterion(tmp_path):
    with pytest.raises(RecipeError, match="lora.use_dora=true: DoRA layers cannot be pruned"):
        load_recipe(_write(tmp_path, BASE), ["lora.use_dora=true", "pruning.importance=lora"])


def test_sharded_training_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="training.fsdp: sharded training is not supported.*docs/distributed.md"):
        load_recipe(_write(tmp_path, BASE), ["training.fsdp=full_shard"])


def test_unknown_criterion_is_refused_with_the_available_ones(tmp_path):
    with pytest.raises(RecipeError, match="pruning.importance: importance='lora2': unknown criterion; available: .*lora"):
        load_recipe(_write(tmp_path, BASE), ["pruning.importance=lora2"])


def test_a_criterion_no_training_step_can_feed_is_refused(tmp_path):
    """Recipes always train; bonsai scores with forward passes of its own (prune_model only)."""
    with pytest.raises(RecipeError, match=r"pruning.importance: importance='bonsai' scores with forward passes of its "
                                          r"own .* hfprune.prune_model"):
        load_recipe(_write(tmp_path, BASE), ["pruning.importance=bonsai"])


def test_distillation_section_builds_a_config(tmp_path):
    from hfprune import DistillationConfig

    recipe = load_recipe(_write(tmp_path, BASE + "distillation: {alpha: 0.7, temperature: 3, hidden_layers: [-1]}"))
    assert recipe.distillation == DistillationConfig(alpha=0.7, temperature=3.0, hidden_layers=(-1,))
    assert recipe.to_dict()["distillation"]["alpha"] == 0.7
    assert load_recipe(_write(tmp_path, BASE)).distillation is None
    with pytest.raises(RecipeError, match="did you mean 'distillation.alpha'"):
        load_recipe(_write(tmp_path, BASE + "distillation: {alpah: 0.5}"))
    with pytest.raises(RecipeError, match=r"distillation: alpha=1.5: must be in \[0, 1\]"):
        load_recipe(_write(tmp_path, BASE), ["distillation.alpha=1.5"])


def test_phases_train_on_one_source_after_the_other(tmp_path):
    """mixing: phases (C4, then instructions): each source shuffled within itself, in order, read sequentially."""
    import json

    from transformers import Trainer

    from hfprune.job import load_data

    from .tiny_models import alpaca_records, tiny_model, tiny_tokenizer

    (tmp_path / "text.txt").write_text("".join(f"{'x' * (5 + i)}\n" for i in range(14)))  # 2 skipped
    records = alpaca_records(20)
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    text = BASE.replace("training: {max_steps: 10}", f"training: {{max_steps: 10, output_dir: {tmp_path / 'out'}}}")
    phases = "data: {train: [{path: text.txt, skip_samples: 2}, alpaca.json], mixing: phases}"
    recipe = load_recipe(_write(tmp_path, text + phases))
    assert recipe.training.train_sampling_strategy == "sequential"
    tokenizer = tiny_tokenizer()
    dataset, formats = load_data(recipe, "train", tokenizer, log=lambda message: None)
    assert formats == ["text", "alpaca"] and len(dataset) == 32
    x = tokenizer.convert_tokens_to_ids("x")
    first = [set(row) - {tokenizer.eos_token_id} for row in dataset["input_ids"][:12]]
    assert all(ids == {x} for ids in first)  # phase 1: the text lines, all of them first
    lengths = [len(row) for row in dataset["input_ids"][:12]]
    assert sorted(lengths) == sorted(set(lengths)) != lengths  # every line once, shuffled within the phase
    assert min(lengths) == 7 + 1  # the two shortest lines, first in the file, were skipped (+ eos)
    assert all(x not in row or len(set(row)) > 2 for row in dataset["input_ids"][12:])  # phase 2: instructions
    trainer = Trainer(model=tiny_model("llama"), args=recipe.training, train_dataset=dataset)
    assert type(trainer._get_train_sampler()).__name__ == "SequentialSampler"


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {train: [{path: a.txt, weight: 1}, {path: b.json, weight: 2}], mixing: phases}",
         "data.train[0].weight with data.mixing=phases"),
        ("data: {train: [a.txt, b.json], mixing: phases}\ntraining: {train_sampling_strategy: group_by_length}",
         "training.train_sampling_strategy='group_by_length' with data.mixing=phases"),
        ("data: {train: [a.txt, b.json], mixing: shuffled}", "must be one of first_exhausted, all_exhausted, phases"),
    ],
)
def test_bad_phase_settings_are_refused(tmp_path, text, message):
    import re

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(_write(tmp_path, BASE + text))


# ---- the sections are documented dataclasses ------------------------------------------------------------------


def test_schema_in_help_is_generated_from_the_sections_metadata():
    import dataclasses

    from hfprune.recipes import DataSource, schema_text
    from hfprune.recipes.sections import SECTIONS

    text = schema_text()
    for section, cls in {**SECTIONS, "data source": DataSource}.items():
        fields = [f for f in dataclasses.fields(cls) if f.init]
        assert fields and all(f.metadata.get("help") for f in fields), f"{section}: every key documented"
        for f in fields:
            line = next(line for line in text.splitlines() if line.split()[:1] == [f.name] and
                        f.metadata["help"] in line)
            assert ("required" in line) == (f.default is dataclasses.MISSING and
                                            f.default_factory is dataclasses.MISSING)
            for choice in f.metadata.get("choices", ()):
                assert choice in line
    assert "local" not in [line.split()[0] for line in text.splitlines() if line.strip()]  # not a recipe key


def test_sections_read_from_the_command_line_like_pruning_config():
    """HfArgumentParser builds flags from the same metadata (EvalSection's bool-or-mapping `speed` has no flag form)."""
    from transformers import HfArgumentParser

    from hfprune.recipes import DataSection, DataSource, ExportSection, ModelSection

    def parse(cls, *argv):
        return HfArgumentParser(cls).parse_args_into_dataclasses(list(argv), look_for_args_file=False)[0]

    model = parse(ModelSection, "--name_or_path", "org/m", "--dtype", "bfloat16", "--load_in_8bit", "true")
    assert model == ModelSection("org/m", dtype="bfloat16", load_in_8bit=True)
    data = parse(DataSection, "--train", "a.json", "org/set", "--mixing", "phases")
    assert data.train == [DataSource("a.json"), DataSource("org/set")] and data.mixing == "phases"
    assert parse(ExportSection, "--overwrite", "--max_shard_size", "2GB") == ExportSection(overwrite=True,
                                                                                            max_shard_size="2GB")
    with pytest.raises(SystemExit):  # the choices of the metadata
        parse(ModelSection, "--name_or_path", "org/m", "--dtype", "int8")


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda s: s.DataSource("a.json", weight=0), ValueError, "weight=0: must be a finite number > 0"),
        (lambda s: s.DataSource("a.json", skip_samples=-1), ValueError, "skip_samples=-1: must be an integer >= 0"),
        (lambda s: s.DataSource(""), TypeError, "path='': must be a non-empty string"),
        (lambda s: s.DataSection(train=["a.json", {"path": "b.json", "weight": 1}]), ValueError,
         "train: give every source a weight, or none"),
        (lambda s: s.DataSection(train=[3]), TypeError, r"train\[0\]=3: must be a path, a hub id or a mapping"),
        (lambda s: s.DataSection(max_length=1), ValueError, "max_length=1: must be an integer >= 2"),
        (lambda s: s.ModelSection("org/m", dtype="int8"), ValueError,
         "dtype='int8': must be one of auto, bfloat16, float16, float32"),
        (lambda s: s.ModelSection("org/m", trust_remote_code="yes"), TypeError,
         "trust_remote_code='yes': must be True or False"),
        (lambda s: s.ExportSection(max_shard_size="5XB"), ValueError, "max_shard_size='5XB'"),
        (lambda s: s.ExportSection(dtype="auto"), ValueError, "dtype='auto': must be one of bfloat16, float16"),
        (lambda s: s.EvalSection(), ValueError, "the eval section measures nothing"),
        (lambda s: s.EvalSection(perplexity=["w.txt"], zero_shot_limit=2.5), ValueError,
         "zero_shot_limit=2.5: must be a whole count"),
        (lambda s: s.EvalSection(speed="fast"), TypeError, "speed='fast': must be true/false or a mapping"),
        (lambda s: s.EvalSection(speed={"prompt_lenn": 8}), ValueError,
         "speed={'prompt_lenn': 8}: 'prompt_lenn' is not an argument of measure_speed; valid: batch_size, prompt_len"),
        (lambda s: s.HubSection(repo_id=""), TypeError, "repo_id='': must be a non-empty string"),
    ],
)
def test_sections_check_their_values_from_python_too(build, error, message):
    from hfprune.recipes import sections

    with pytest.raises(error, match=message):
        build(sections)


def test_sections_normalise_the_short_forms():
    from hfprune.recipes import DataSection, DataSource, EvalSection, ExportSection

    data = DataSection(train="a.json", eval={"path": "org/set", "split": "test"})
    assert data.train == [DataSource("a.json")] and data.train[0].local
    assert data.eval[0].split == "test" and not data.eval[0].local
    assert EvalSection(perplexity="w.txt").perplexity == ["w.txt"]
    assert EvalSection(tasks=["boolq"], zero_shot_limit=20.0).zero_shot_limit == 20
    assert ExportSection(max_shard_size="1000").max_shard_size == 1000


def test_values_are_read_as_the_command_line_reads_them(tmp_path):
    """YAML 1.2 booleans: `no` stays "no" for a strategy and means false for a true/false key."""
    path = _write(tmp_path, BASE.replace("training: {max_steps: 10}",
                                         "training: {max_steps: 10, save_strategy: no, eval_strategy: no}")
                  + "data: {train: a.json, train_on_prompt: yes, max_length: '256'}")
    recipe = load_recipe(path)
    assert recipe.training.save_strategy == "no" and recipe.training.eval_strategy == "no"
    assert recipe.data.train_on_prompt is True and recipe.data.max_length == 256
    recipe = load_recipe(path, ["training.save_strategy=no", "training.logging_strategy=no", "data.train_on_prompt=no"])
    assert recipe.training.save_strategy == "no" == recipe.training.logging_strategy
    assert recipe.data.train_on_prompt is False
    assert recipe.raw["training"]["save_strategy"] == "no"


# ---- bad input refused at load, naming the value (issue 12) --------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff", r"bad.yaml: not a UTF-8 text file \(byte 0x89 on line 1, offset 0\)"),
        ("model:\n  name_or_path: caf\xe9\n".encode("latin-1"),
         r"bad.yaml: not a UTF-8 text file \(byte 0xe9 on line 2, offset 26\)"),
        (b"model: \x00\x01\n", r"bad.yaml: not valid YAML: unacceptable character #x0000"),
    ],
)
def test_binary_or_non_utf8_recipe_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train.5.path=x"], r"override 'data.train.5.path=x': '5' is not an index of a list of 1 \(0 to 0\)"),
        (["training.per_device_train_batch_size=0"], "training.per_device_train_batch_size=0: must be an integer >= 1"),
        (["training.per_device_eval_batch_size=-2"], "training.per_device_eval_batch_size=-2: must be an integer >= 1"),
        (["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps=0: must be an integer >= 1"),
        (["training.learning_rate=-1e-4"], "training.learning_rate=-0.0001: must be a finite number >= 0"),
        (["training.learning_rate=nan"], "training.learning_rate=nan: must be a finite number >= 0"),
        (["training.save_strategy=false"], "training.save_strategy=False: expected one of no, steps, epoch, best"),
        (["pruning.protected_layers=[0.7]"], r"pruning.protected_layers\[0\]=0.7: expected an integer"),
        (["pruning.protected_layers=0,1"], "pruning: protected_layers='0,1': must be a list of integers"),
        (["pruning.uniform=maybe"], "pruning.uniform='maybe': expected true/false"),
        (["pruning.seed=abc"], "pruning.seed='abc': expected an integer"),
        (["pruning.target_sparsity=.nan"], r"pruning: target_sparsity=nan: must be in \[0, 1\)"),
        (["lora.task_type=FOO"], "lora.task_type='FOO': expected one of .*CAUSAL_LM"),
        (["eval.speed=3"], "eval: speed=3: must be true/false or a mapping"),
        (["hub.private=true"], "hub.repo_id is required"),
    ],
)
def test_bad_values_are_refused_when_the_recipe_is_loaded(tmp_path, overrides, message):
    path = _write(tmp_path, BASE + "data: {train: [a.json]}")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, overrides)


# ---- recipes by name, from anywhere (issue 15) ---------------------------------------------------------------


def test_shipped_recipes_are_the_repository_recipes():
    from hfprune.recipes import shipped_recipes

    shipped = shipped_recipes()
    assert sorted(shipped) == [p.stem for p in RECIPES]
    assert all(path.read_bytes() == (ROOT / "recipes" / path.name).read_bytes() for path in shipped.values())


def test_recipes_load_by_name_from_any_directory(tmp_path, monkeypatch):
    by_path = load_recipe(ROOT / "recipes" / "llama-7b-20.yaml", check_device=False)
    monkeypatch.chdir(tmp_path)
    for name in ("llama-7b-20", "llama-7b-20.yaml"):
        recipe = load_recipe(name, check_device=False)
        assert recipe.name == "llama-7b-20" and recipe.to_dict() == by_path.to_dict()
    with pytest.raises(FileNotFoundError,
                       match="recipe 'llama-7b-21': no such file; shipped recipes, by name: .*llama-7b-20"):
        load_recipe("llama-7b-21")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_recipe("elsewhere/llama-7b-20.yaml")  # a path is a path: no fallback to the shipped one


def test_an_installed_copy_finds_its_data_or_says_to_set_the_data_dir(tmp_path, data_dir, monkeypatch):
    """A shipped recipe away from the repository (as in a wheel): its `../../shared/data` default leads nowhere."""
    copy = tmp_path / "site-packages" / "recipes" / "smollm2-135m-demo.yaml"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((ROOT / "recipes" / copy.name).read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HFPRUNE_DATA_DIR", raising=False)
    with pytest.raises(RecipeError, match=r"data.train\[0\].path='.*/shared/data/alpaca_en_demo.json': no such file or "
                                          r"directory; HFPRUNE_DATA_DIR is not set.*set HFPRUNE_DATA_DIR"):
        load_recipe(copy, check_device=False)
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    recipe = load_recipe(copy, check_device=False)
    assert recipe.data.train[0].path == str(data_dir / "alpaca_en_demo.json")
    assert recipe.eval.perplexity == [str(data_dir / "wiki_demo.txt"), str(data_dir / "c4_demo.jsonl")]
