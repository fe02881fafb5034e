"""The `hfprune` command in-process: help, plan, prune end to end, eval, push, estimate, and its errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hfprune.cli import main

from .tiny_models import TEXT, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent

def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err



def _recipe(tmp_path: Path, base: Path, **sections) -> Path:
    """The tiny Llama's recipe, with an eval section."""
    return tiny_recipe(tmp_path, base, with_eval=True, **sections)


# ---- help ---------------------------------------------------------------------------------------------------

OPTIONS = {
    "prune": ["RECIPE.yaml", "KEY=VALUE", "--dry-run", "--json"],
    "plan": ["--steps", "--world-size", "--with-lora", "--per-layer", "--no-memory", "--json", "--dry-run"],
    "eval": ["--ppl-source", "--seq-len", "--max-windows", "--baseline", "--speed", "--tasks", "--task-dir",
             "--output", "--tail", "--batch-size", "--zero-shot-limit", "--zero-shot-batch-size", "--zero-shot-dev", "--zero-shot-dev-tasks",
             "--device", "--dtype", "--trust-remote-code"],
    "push": ["DIR", "REPO_ID", "--private", "--token", "--revision", "--commit-message", "--create-pr"],
    "estimate": ["MODEL_OR_CONFIG", "--criterion", "--load-in-8bit", "--seq-len", "--batch", "--lora-r",
                 "--no-gradient-checkpointing", "--gpu-gb"],
    "export": ["CHECKPOINT_DIR", "--to", "--outtype", "--output", "--overwrite", "--tokenizer-from"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_explains_every_option(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    for option in OPTIONS[command]:
        assert option in out, f"{command} --help does not mention {option}"
    assert "(default:" in out


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and all(name in out for name in OPTIONS)
    assert _run(capsys)[0] == 2  # no command: usage error


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["estimate", "--help"], ["prune", "--help"]])
def test_config_only_help_imports_no_torch(argv):
    """`--help` builds the parser from the recipes' schema and the criterion names: none of it needs torch
    (nor transformers), so it starts in a fraction of a second."""
    import subprocess
    import sys

    code = (f"import sys; from hfprune.cli import main; code = main({argv!r}); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'bitsandbytes', 'peft'}); "
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr


def test_estimate_help_lists_every_built_in_criterion(capsys):
    from hfprune.importance.names import BUILTIN_CRITERIA

    code, out, _ = _run(capsys, "estimate", "--help")
    assert code == 0
    assert all(name in " ".join(out.split()) for name in BUILTIN_CRITERIA)


# ---- plan ---------------------------------------------------------------------------------------------------


def test_plan_of_the_65b_recipe_prints_widths_in_seconds(capsys, tmp_path):
    start = time.perf_counter()
    code, out, err = _run(capsys, "plan", str(ROOT / "recipes" / "llama-65b-50.yaml"), "--dry-run",
                          "--json", str(tmp_path / "plan.json"))
    seconds = time.perf_counter() - start
    assert code == 0, err
    assert seconds < 60, f"hfprune plan took {seconds:.1f} s"
    assert "0-7 (protected)" in out and "8-78" in out and "64 -> 32" in out and "22016 -> 11008" in out
    assert "65.29B -> 36.55B" in out and "heterogeneous" in out and "794 optimizer steps" in out
    assert "Peak:" in out  # the memory estimate for the recipe's settings
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["num_layers"] == 80 and len(plan["layers"]) == 80


def test_plan_of_a_bare_model_config_with_overrides(capsys):
    code, out, err = _run(capsys, "plan", "smollm2-135m", "pruning.target_sparsity=0.5", "pruning.uniform=true",
                          "pruning.head_granularity=query_head", "--steps", "100")
    assert code == 0, err
    assert "9 -> 6" in out and "uniform" in out and "100 optimizer steps" in out


def test_unknown_recipe_key_is_one_line_with_a_suggestion(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: org/m, model_config: smollm2-135m}\npruning: {target_sparsty: 0.5}\n")
    for command in ("plan", "prune"):
        code, out, err = _run(capsys, command, str(path))
        assert code == 2
        assert err.strip().count("\n") == 0 and "Traceback" not in err
        assert "unknown key 'pruning.target_sparsty'; did you mean 'pruning.target_sparsity'?" in err


def test_bad_override_type_is_refused(capsys):
    recipe = str(ROOT / "recipes" / "llama-7b-20.yaml")
    code, _, err = _run(capsys, "plan", recipe, "pruning.target_sparsity=abc")
    assert code == 2 and "pruning.target_sparsity='abc': expected a number" in err
    code, _, err = _run(capsys, "plan", recipe, "training.num_train_epochs=two")
    assert code == 2 and "training.num_train_epochs='two': expected a number" in err
    code, _, err = _run(capsys, "plan", recipe, "pruning.target_sparsity=1.5")
    assert code == 2 and "target_sparsity=1.5: must be in [0, 1)" in err


@pytest.mark.parametrize("steps", ["-3", "0", "two"])
def test_plan_refuses_a_step_count_below_one(capsys, steps):
    code, out, err = _run(capsys, "plan", "smollm2-135m", "--steps", steps)
    assert code == 2 and not out
    assert f"argument --steps: {steps if steps != 'two' else repr(steps)}: must be an integer >= 1" in err


def test_prune_help_lists_the_section_keys_and_the_shipped_recipes(capsys):
    code, out, _ = _run(capsys, "prune", "--help")
    assert code == 0
    assert "max_shard_size" in out and "Shard size of the safetensors files" in out  # ExportSection's metadata
    assert "one of first_exhausted, all_exhausted, phases" in out
    assert "shipped recipes, by name:" in out and "llama-65b-50" in out and "smollm2-135m-demo" in out


def test_recipes_run_by_name_from_any_directory(capsys, tmp_path, monkeypatch, data_dir, smollm2_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    code, out, err = _run(capsys, "plan", "llama-7b-20")
    assert code == 0, err
    assert "Plan for llama-7b " in out and "Peak:" in out  # planned as a recipe, with its memory estimate
    code, out, err = _run(capsys, "prune", "smollm2-135m-demo", "--dry-run")
    assert code == 0, err
    assert f"{data_dir / 'alpaca_en_demo.json'} -- 999 alpaca records" in out and "100 optimizer steps" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_missing_recipe_and_debug_traceback(capsys, tmp_path):
    code, _, err = _run(capsys, "plan", str(tmp_path / "none.yaml"))
    assert code == 2 and "no such file" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "plan", str(tmp_path / "none.yaml")])


# ---- prune --------------------------------------------------------------------------------------------------


def test_prune_runs_a_tiny_recipe_end_to_end(capsys, tmp_path, tiny_base, local_hub):
    pytest.importorskip("hfprune.export")
    from transformers import AutoModelForCausalLM

    from hfprune.sparsity import count_parameters

    path = _recipe(tmp_path, tiny_base, hub={"repo_id": "test-user/tiny-cli", "token_env": "HF_TOKEN"})
    code, out, err = _run(capsys, "prune", str(path), "pruning.target_sparsity=0.5", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    model_dir = tmp_path / "model"
    report = json.loads((model_dir / "pruning_report.json").read_text())
    assert report["reached"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert set(report["evaluation"]) >= {"pruned", "dense", "prefill_speedup", "flops_speedup_limit"}
    assert report["evaluation"]["pruned"]["params"] < report["evaluation"]["dense"]["params"]
    assert report["recipe"]["settings"]["pruning"]["target_sparsity"] == 0.5
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["train"]["global_step"] == 4 and summary["evaluation"]["dense"]["perplexity"]
    assert "hfprune summary" in out and "| perplexity" in out
    from hfprune.export import register_auto_classes

    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert count_parameters(loaded) == report["parameters"]["after"] < report["parameters"]["before"]
    assert {"pruning_report.json", "model.safetensors", "README.md"} <= set(local_hub.list_files("test-user/tiny-cli"))


def test_same_seed_and_inputs_give_the_same_pruned_model(capsys, tmp_path, tiny_base):
    pytest.importorskip("hfprune.export")
    kept = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        code, _, err = _run(capsys, "prune", str(_recipe(tmp_path / run, tiny_base, eval=None)))
        assert code == 0, err
        layers = json.loads((tmp_path / run / "model" / "pruning_report.json").read_text())["layers"]
        kept.append([(l.get("kept_query_heads"), l.get("kept_channels")) for l in layers])
    assert kept[0] == kept[1]


def test_prune_dry_run_checks_everything_and_writes_nothing(capsys, tmp_path, tiny_base, no_model_load):
    code, out, err = _run(capsys, "prune", str(_recipe(tmp_path, tiny_base)), "--dry-run")
    assert code == 0, err
    assert "32 alpaca records" in out and "Plan for" in out
    assert not (tmp_path / "model").exists() and not (tmp_path / "trainer").exists()


def test_existing_output_directory_is_refused_before_training(capsys, tmp_path, tiny_base, no_model_load):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, _, err = _run(capsys, "prune", str(_recipe(tmp_path, tiny_base)))
    assert code == 2
    assert "export.output_dir=" in err and "exists and is not empty; pass export.overwrite=true" in err


def test_earlier_checkpoints_are_refused_unless_resumed(capsys, tmp_path, tiny_base, no_model_load):
    (tmp_path / "trainer" / "checkpoint-2").mkdir(parents=True)
    code, _, err = _run(capsys, "prune", str(_recipe(tmp_path, tiny_base)))
    assert code == 2 and "holds checkpoints of an earlier run (checkpoint-2)" in err
    code, _, err = _run(capsys, "prune", str(_recipe(tmp_path, tiny_base)), "training.resume_from_checkpoint=/no/such")
    assert code == 2 and "no such checkpoint directory" in err


def test_data_without_the_needed_fields_is_refused_before_training(capsys, tmp_path, tiny_base, no_model_load):
    path = _recipe(tmp_path, tiny_base)
    (tmp_path / "qa.jsonl").write_text('{"question": "why?", "answer": "because"}\n')
    code, _, err = _run(capsys, "prune", str(path), "data.train=qa.jsonl")
    assert code == 2
    assert "data.train[0]" in err and "match no known format" in err and "alpaca: ['instruction', 'output']" in err
    code, _, err = _run(capsys, "prune", str(path), "data.train=[{path: qa.jsonl, text_field: body}]")
    assert code == 2 and "text_field='body' is not a column" in err
    code, _, err = _run(capsys, "prune", str(path), "data.train=missing.json")
    assert code == 2 and "no such file" in err


def test_data_with_nothing_to_train_on_is_refused_before_training(capsys, tmp_path, tiny_base, no_model_load):
    path = _recipe(tmp_path, tiny_base)
    records = [{"prompt": "p" * 200, "completion": "c"}] * 3  # trl's prompt-completion format, prompts too long
    (tmp_path / "long.json").write_text(json.dumps(records))
    code, _, err = _run(capsys, "prune", str(path), "data.train=long.json", "data.max_length=64",
                        "data.train_on_prompt=false")
    assert code == 2
    assert "data.train[0] (" in err and "none of its 3 prompt_completion records has a response token left" in err
    assert "max_length=64" in err


def test_missing_eval_file_and_hub_token_are_refused_before_training(capsys, tmp_path, tiny_base, no_model_load,
                                                                    monkeypatch):
    path = _recipe(tmp_path, tiny_base)
    code, _, err = _run(capsys, "prune", str(path), "eval.perplexity=[missing.txt]")
    assert code == 2 and "missing.txt" in err and "no such file" in err
    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    code, _, err = _run(capsys, "prune", str(path), "hub.repo_id=me/x", "hub.token_env=MY_HUB_TOKEN")
    assert code == 2 and "MY_HUB_TOKEN is not set" in err


def test_infeasible_target_is_refused_before_training(capsys, tmp_path, tiny_base, no_model_load):
    path = _recipe(tmp_path, tiny_base)
    code, _, err = _run(capsys, "prune", str(path), "pruning.target_sparsity=0.9", "pruning.structures=[heads]")
    assert code == 2 and "target_sparsity=0.9: layer 1 can give up at most" in err


def test_pickle_checkpoints_are_refused(capsys, tmp_path, tiny_base, no_model_load):
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_base, hostile)
    (hostile / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, _, err = _run(capsys, "eval", str(hostile), "--ppl-source", "wikitext2")
    assert code == 2 and "pickle" in err and "pytorch_model.bin" in err
    code, _, err = _run(capsys, "prune", str(_recipe(tmp_path, hostile)))
    assert code == 2 and "pickle" in err


# ---- eval, push, estimate -------------------------------------------------------------------------------------


def test_eval_compares_with_a_baseline(capsys, tmp_path, tiny_base):
    (tmp_path / "text.txt").write_text(TEXT)
    output = tmp_path / "eval.json"
    code, out, err = _run(capsys, "eval", str(tiny_base), "--ppl-source", str(tmp_path / "text.txt"),
                          "--seq-len", "16", "--max-windows", "2", "--baseline", str(tiny_base),
                          "--output", str(output))
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["pruned"]["perplexity"] == report["dense"]["perplexity"]
    assert "| perplexity" in out and output.with_suffix(".md").exists()
    code, _, err = _run(capsys, "eval", str(tiny_base))
    assert code == 2 and "nothing to measure" in err


def test_eval_scores_the_zero_shot_dev_suites(capsys, tmp_path, tiny_base, data_dir):
    dev = data_dir / "zeroshot_dev"
    output = tmp_path / "eval.json"
    code, out, err = _run(capsys, "eval", str(tiny_base), "--zero-shot-dev", str(dev), "--zero-shot-dev-tasks",
                          "piqa", "winogrande", "--zero-shot-limit", "2", "--output", str(output))
    assert code == 0, err
    scores = json.loads(output.read_text())["pruned"]["zero_shot_dev"]
    assert list(scores) == ["piqa", "winogrande", "average"]
    assert scores["piqa"]["n"] == scores["winogrande"]["n"] == 2 and scores["average"]["n"] == 4
    assert "| piqa acc_norm (dev) |" in out and "| average acc (dev) |" in out and "winogrande acc_norm" not in out
    # bad input is refused before any model is loaded
    code, _, err = _run(capsys, "eval", str(tiny_base), "--zero-shot-dev", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere': not a directory; it must hold piqa.jsonl" in err
    code, _, err = _run(capsys, "eval", str(tiny_base), "--zero-shot-dev", str(dev), "--zero-shot-dev-tasks", "boolq")
    assert code == 2 and "tasks=['boolq']: unknown multiple-choice tasks; valid tasks are piqa" in err
    code, _, err = _run(capsys, "eval", str(tiny_base), "--zero-shot-dev", str(dev), "--zero-shot-limit", "0.5")
    assert code == 2 and "limit=0.5: must be None (every row) or an integer >= 1" in err


def test_push_uploads_a_checkpoint(capsys, tmp_path, tiny_base, local_hub):
    pytest.importorskip("hfprune.hub")
    import torch

    from hfprune import PruningConfig, prune_model
    from hfprune.export import save_pruned

    from .tiny_models import tiny_model, tiny_tokenizer

    model = prune_model(tiny_model("llama"), PruningConfig(target_sparsity=0.3, importance="magnitude",
                                                           uniform=True, protected_layers=()))
    save_pruned(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer(), dtype=torch.float32)
    code, out, err = _run(capsys, "push", str(tmp_path / "ckpt"), "test-user/cli-push", "--private")
    assert code == 0, err
    assert "pushed" in out and "config.json" in local_hub.list_files("test-user/cli-push")
    code, _, err = _run(capsys, "push", str(tmp_path / "nothing"), "test-user/x")
    assert code == 2 and "no such checkpoint directory" in err


def test_estimate_compares_lora_with_taylor(capsys):
    code, out, err = _run(capsys, "estimate", "llama-65b", "--criterion", "lora", "--load-in-8bit", "--seq-len", "512",
                          "--batch", "1", "--lora-r", "8")
    assert code == 0, err
    assert "llama-65b" in out and "Peak:" in out and "Fits one 80 GB GPU: yes" in out
    assert "lora (8-bit)" in out and "taylor (bf16)" in out
    code, _, err = _run(capsys, "estimate", "llama-7b", "--criterion", "taylor", "--load-in-8bit")
    assert code == 2 and "taylor" in err


def test_estimate_the_new_criteria(capsys):
    code, out, err = _run(capsys, "estimate", "smollm2-135m", "--criterion", "bonsai")
    assert code == 0, err
    assert "criterion `bonsai`, 8-bit base" in out and "forward passes (no grad) (peak)" in out
    code, out, err = _run(capsys, "estimate", "smollm2-135m", "--criterion", "param_second")
    assert code == 0, err
    assert "criterion `param_second`, bfloat16 base" in out and "needs a gradient for every weight" in out
    code, _, err = _run(capsys, "estimate", "smollm2-135m", "--criterion", "param_second", "--load-in-8bit")
    assert code == 2 and "param_second" in err


def test_prune_with_distillation_and_two_phases(capsys, tmp_path, tiny_base, monkeypatch):
    """The recipe's distillation section reaches PruningTrainer, and mixing: phases trains text, then instructions."""
    from hfprune import distill

    calls = []
    real_step = distill.distillation_step
    monkeypatch.setattr(distill, "distillation_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    path = _recipe(
        tmp_path, tiny_base, eval=None,
        pruning={"physical_removal": "at_end"},
        distillation={"alpha": 0.5, "temperature": 2.0},
        data={"train": [{"path": "text.txt", "skip_samples": 1}, "data.json"], "mixing": "phases"},
    )
    code, out, err = _run(capsys, "prune", str(path))
    assert code == 0, err
    assert "2 phases of 7, 32 examples" in out + err
    assert len(calls) == 4  # every step distilled from the dense teacher, recovery included
    report = json.loads((tmp_path / "model" / "pruning_report.json").read_text())
    settings = report["recipe"]["settings"]
    assert settings["distillation"]["alpha"] == 0.5 and settings["data"]["mixing"] == "phases"
    assert report["reached"]["sparsity"] == pytest.approx(0.5, abs=0.02)
