"""One export path: the Python API, the CLI and the trl callback path write the same loadable checkpoint,
with one report and a model card that tells what was removed and what it cost."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hfprune import PruningCallback, PruningConfig, PruningTrainer, prune_model
from hfprune.cli import main
from hfprune.export import save_pruned
from hfprune.model_card import CARD_FILE, CHART_FILE, record_evaluation
from hfprune.report import REPORT_FILE, PruningReport

from .tiny_models import alpaca_records, batch, save_tiny, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Do you wish to run the custom code"
TEXT = "the quick brown fox jumps over the lazy dog while small birds sing in tall green trees\n" * 8
TRAINING = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 2e-3, "logging_steps": 1,
            "save_strategy": "no", "use_cpu": True, "seed": 0, "report_to": []}
PRUNING = {"target_sparsity": 0.5, "importance": "lora", "prune_every": 1, "protected_layers": [0], "seed": 0}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _report(directory: Path) -> dict:
    return json.loads((directory / REPORT_FILE).read_text())


def _logits(model, ids=None):
    with torch.no_grad():
        return model(batch() if ids is None else ids).logits


# ---- the report --------------------------------------------------------------------------------------------


def test_report_round_trips_and_merges_without_claiming_more(tmp_path):
    report = PruningReport(criterion="lora", parameters={"before": None, "after": 10}, extra={"note": "kept"})
    report.update({"parameters": {"before": 12}, "criterion": None, "datasets": [{"path": "data.json"}]})
    assert report.criterion == "lora"  # None never overwrites what is known
    assert report.parameters == {"before": 12, "after": 10} and report.datasets == [{"path": "data.json"}]
    report.save(tmp_path)
    data = _report(tmp_path)
    assert data["note"] == "kept" and data["evaluation"] is None and data["reached"] is None  # unknown is null
    assert PruningReport.from_dir(tmp_path) == report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written through a rename
    with pytest.raises(FileNotFoundError, match="no pruning_report.json"):
        PruningReport.from_dir(tmp_path / "none")


# ---- the Python API and the CLI ------------------------------------------------------------------------------


def _write_recipe(directory: Path, base: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "data.json").write_text(json.dumps(alpaca_records(32)))
    recipe = {
        "model": {"name_or_path": str(base), "load_in_8bit": False, "dtype": "float32"},
        "pruning": PRUNING,
        "data": {"train": "data.json", "max_length": 128, "train_on_prompt": True},
        "training": {**TRAINING, "output_dir": str(directory / "trainer")},
        "export": {"output_dir": str(directory / "model")},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_python_api_and_cli_write_the_same_checkpoint(tmp_path, capsys):
    base = tmp_path / "base"
    save_tiny("llama", base)
    assert main(["prune", str(_write_recipe(tmp_path / "cli", base))]) == 0, capsys.readouterr().err
    cli = tmp_path / "cli" / "model"

    trainer = PruningTrainer(
        model=str(base), load_in_8bit=False, model_init_kwargs={"dtype": "float32"},
        args=TrainingArguments(output_dir=str(tmp_path / "api" / "trainer"), **TRAINING),
        pruning_config=PruningConfig(**{**PRUNING, "protected_layers": tuple(PRUNING["protected_layers"])}),
        train_dataset=datasets.Dataset.from_list(alpaca_records(32)), max_length=128, train_on_prompt=True,
    )
    trainer.train()
    api = trainer.save_model(str(tmp_path / "api" / "model"))

    assert sorted(p.name for p in api.iterdir()) == sorted(p.name for p in cli.iterdir())
    assert {CARD_FILE, CHART_FILE, REPORT_FILE, "tokenizer.json", "model.safetensors"} <= {p.name for p in api.iterdir()}
    ours, theirs = _weights(api), _weights(cli)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours), "the two paths trained different weights"
    assert json.loads((api / "config.json").read_text()) == json.loads((cli / "config.json").read_text())
    api_report, cli_report = _report(api), _report(cli)
    assert api_report.keys() == cli_report.keys()
    only_the_recipe_knows = {"recipe", "datasets"}
    for key in api_report.keys() - only_the_recipe_knows:
        assert api_report[key] == cli_report[key], key
    assert api_report["recipe"] is None and cli_report["recipe"]["name"] == "recipe"
    assert cli_report["datasets"][0]["path"].endswith("data.json")
    assert api_report["criterion"] == "lora" and api_report["optimizer_steps"] == 4
    assert api_report["parameters"]["before"] > api_report["parameters"]["after"]


# ---- the trl path ----------------------------------------------------------------------------------------------


def _sft_trainer(tmp_path, callback):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    texts = [{"text": r["instruction"] + " " + r["output"]} for r in alpaca_records(32)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=2, learning_rate=2e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
    )
    return trl.SFTTrainer(
        model=tiny_model("qwen2"), args=args, train_dataset=datasets.Dataset.from_list(texts),
        processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[callback],
    )


def test_sft_trainer_with_the_callback_saves_a_loadable_checkpoint(tmp_path):
    callback = PruningCallback(PruningConfig(target_sparsity=0.3, importance="lora", prune_every=1, protected_layers=(0,)))
    trainer = _sft_trainer(tmp_path, callback)
    trainer.train()
    assert callback.physically_pruned

    # the obvious call, and peft's own, refuse before writing an adapter nobody can load
    for save in (lambda: trainer.save_model(str(tmp_path / "plain")),
                 lambda: trainer.model.save_pretrained(tmp_path / "plain"),
                 lambda: trainer.model.get_base_model().save_pretrained(tmp_path / "plain")):
        with pytest.raises(RuntimeError, match=r"callback\.save_pruned\(trainer, output_dir\)"):
            save()
    assert not list((tmp_path / "plain").glob("*.safetensors")) and not (tmp_path / "plain" / "adapter_config.json").exists()

    out = callback.save_pruned(trainer)
    assert out == tmp_path / "sft" / "pruned"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The transformers model inside the PeftModel: the PeftModel's forward carries accelerate's bf16 autocast
    # (SFTConfig's default precision), the exported float32 weights do not.
    in_memory = trainer.model.get_base_model().eval()
    torch.testing.assert_close(_logits(loaded), _logits(in_memory), atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("red cat")["input_ids"] == tiny_tokenizer()("red cat")["input_ids"]
    report = _report(out)
    assert report["criterion"] == "lora" and report["pruning_config"]["target_sparsity"] == 0.3
    assert report["reached"]["sparsity"] == pytest.approx(callback.sparsity().sparsity)
    assert report["optimizer_steps"] == 6 and report["train_examples"] == 32 and report["history"]
    assert report["parameters"]["before"] == callback.sparsity().total_params > report["parameters"]["after"]
    assert all("kept_channels" in layer and "original" in layer for layer in report["layers"])
    assert (out / CARD_FILE).is_file() and "## What was removed" in (out / CARD_FILE).read_text()
    # the same call again replaces the earlier export (and only that)
    assert callback.save_pruned(trainer, out) == out


def test_training_again_lifts_the_refusal(tmp_path):
    callback = PruningCallback(PruningConfig(target_sparsity=0.3, importance="lora", prune_every=1, protected_layers=(0,)))
    trainer = _sft_trainer(tmp_path, callback)
    trainer.train()
    model = trainer.model
    from transformers import TrainerState

    fresh = TrainerState(max_steps=trainer.state.max_steps)  # what Trainer.train() starts again from
    callback.on_train_begin(trainer.args, fresh, trainer.control, model=model)
    model.save_pretrained(tmp_path / "checkpoint")  # what the Trainer's checkpoints need while training
    assert (tmp_path / "checkpoint" / "adapter_config.json").is_file()


# ---- what the exported files say ---------------------------------------------------------------------------


def test_trained_export_names_the_hub_base_has_inference_defaults_and_readable_files(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("ab" * 20)
    save_tiny("llama", snapshot)
    trainer = PruningTrainer(
        model=str(snapshot), load_in_8bit=False,  # the path a cache lookup gives, as `hfprune prune` passes it
        args=TrainingArguments(output_dir=str(tmp_path / "out"), **{**TRAINING, "max_steps": 2}),
        pruning_config=PruningConfig(target_sparsity=0.3, importance="lora", prune_every=1, protected_layers=(0,)),
        train_dataset=datasets.Dataset.from_list(alpaca_records(8)),
    )
    assert trainer.model.config.use_cache is False  # what training sets
    trainer.train()
    out = trainer.save_model(dtype="bfloat16")
    report = _report(out)
    assert report["base_model"] == "org/tiny-llama" and report["base_model_revision"] == "ab" * 20
    assert report["dtype"] == "bfloat16" and AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert AutoConfig.from_pretrained(out).use_cache is True
    assert json.loads((out / "config.json").read_text()).get("use_cache", True) is True
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o644 == 0o644, f"{path.name} is {oct(mode)}, not readable like a checkpoint"
    assert stat.S_IMODE(out.stat().st_mode) & 0o755 == 0o755


def _channels_only():
    model = tiny_model("llama")
    return prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.3, structures=("channels",),
                                            protected_layers=(0,)))


def test_card_says_which_structures_were_removed(tmp_path):
    out = save_pruned(_channels_only(), tmp_path / "channels", tokenizer=tiny_tokenizer())
    text = (out / CARD_FILE).read_text()
    assert "| structures removed | MLP channels |" in text
    summary = text.split("## What was removed")[0]
    assert "whole MLP channels were removed" in summary
    assert not re.search(r"heads|KV groups", summary), summary

    model = tiny_model("llama")
    prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.5, protected_layers=(0,),
                                     head_granularity="kv_group"))
    text = (save_pruned(model, tmp_path / "both") / CARD_FILE).read_text()
    assert "| structures removed | KV groups, query heads, MLP channels |" in text
    assert "whole KV groups (a key/value head with the query heads it serves) and whole MLP channels" in text


def test_card_of_an_evaluated_export_shows_its_perplexity(tmp_path, capsys):
    out = save_pruned(_channels_only(), tmp_path / "model", tokenizer=tiny_tokenizer())
    (tmp_path / "text.txt").write_text(TEXT)
    assert "## Measured" not in (out / CARD_FILE).read_text()
    code = main(["eval", str(out), "--ppl-source", str(tmp_path / "text.txt"), "--seq-len", "16",
                 "--max-windows", "2", "--baseline", str(out)])
    assert code == 0, capsys.readouterr().err
    evaluation = _report(out)["evaluation"]
    perplexity = evaluation["pruned"]["perplexity"][str(tmp_path / "text.txt")]
    text = (out / CARD_FILE).read_text()
    assert "## Measured" in text and f"| perplexity text (seq 16) | {perplexity:.2f} | {perplexity:.2f} | 1.00x |" in text
    assert str(tmp_path) not in text  # local paths stay in the report
    from huggingface_hub import ModelCard

    results = ModelCard.load(out / CARD_FILE).data.eval_results
    assert [(r.dataset_name, r.metric_value) for r in results] == [("text", round(perplexity, 4))]

    # a card its author claimed (marker deleted) is left alone; the report still gets the numbers
    (out / CARD_FILE).write_text("# my card\n")
    record_evaluation(out, {**evaluation, "settings": {"seq_len": 32}})
    assert (out / CARD_FILE).read_text() == "# my card\n" and _report(out)["evaluation"]["settings"]["seq_len"] == 32


def test_card_names_the_licence_of_a_hub_base(tmp_path, local_hub):
    from huggingface_hub import HfApi

    repo = HfApi().create_repo("tiny-base").repo_id
    HfApi().upload_file(path_or_fileobj=b"---\nlicense: apache-2.0\n---\n# base\n", path_in_repo=CARD_FILE,
                        repo_id=repo)
    model = _channels_only()
    model.config._name_or_path = repo  # as from_pretrained(repo) leaves it; from_pretrained never fetches the card
    out = save_pruned(model, tmp_path / "model")
    card = (out / CARD_FILE).read_text()
    assert "license: apache-2.0" in card and f"`apache-2.0`: the licence of [`{repo}`]" in card
    assert _report(out)["base_model"] == repo


# ---- loading as the card says, without a terminal ----------------------------------------------------------------


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def _run_without_terminal(code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """A script as a user's job runs it: stdin closed, no controlling terminal (a prompt would fail or hang)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, start_new_session=True, timeout=300)


@pytest.mark.slow  # two Python processes
def test_the_cards_loading_snippets_run_as_written(tmp_path, local_hub):
    from hfprune.hub import push_pruned

    model = tiny_model("llama")
    prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.3, protected_layers=(3,)))
    out = save_pruned(model, tmp_path / "hetero", tokenizer=tiny_tokenizer(), uniform=False)
    repo = "test-user/tiny-hetero"
    push_pruned(out, repo)
    card = (out / CARD_FILE).read_text()
    with_hfprune, without_hfprune = _python_blocks(card)
    assert "register_auto_classes()" in with_hfprune and "trust_remote_code" not in with_hfprune
    assert without_hfprune.count("trust_remote_code=True") == 2

    expected = _logits(model)
    check = textwrap.dedent(f"""
        import json, torch
        ids = torch.tensor({batch().tolist()})
        with torch.no_grad():
            logits = model.eval()(ids).logits
        assert tokenizer("red cat")["input_ids"] == {tiny_tokenizer()("red cat")["input_ids"]}
        print("LOGITS", json.dumps(logits.tolist()))
    """)
    fake = tmp_path / "no_hfprune" / "hfprune"  # hfprune not installed
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hfprune is not installed here')\n")
    for snippet, path in ((with_hfprune, str(ROOT)), (without_hfprune, str(fake.parent))):
        env = {**os.environ, "PYTHONPATH": path, "HF_MODULES_CACHE": str(tmp_path / "modules")}
        result = _run_without_terminal(snippet + check, tmp_path, env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert PROMPT not in result.stdout + result.stderr
        logits = torch.tensor(json.loads(result.stdout.split("LOGITS ", 1)[1]))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a second Python process
def test_tokenizer_of_a_heterogeneous_export_loads_without_a_prompt_after_import_hfprune(tmp_path):
    """`import hfprune` registers the hfprune_* config: transformers finds the config class locally and asks nothing."""
    model = tiny_model("llama")
    prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.3, protected_layers=(3,)))
    out = save_pruned(model, tmp_path / "hetero", tokenizer=tiny_tokenizer(), uniform=False)
    assert json.loads((out / "config.json").read_text())["auto_map"]
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())  # a stock tokenizer
    code = textwrap.dedent(f"""
        import hfprune
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        print("TOKENS", tokenizer("red cat")["input_ids"])
    """)
    result = _run_without_terminal(code, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert PROMPT not in result.stdout + result.stderr
    assert f"TOKENS {tiny_tokenizer()('red cat')['input_ids']}" in result.stdout
