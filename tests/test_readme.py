"""The README's code blocks, run as written on tiny local models.

Each block is found by its `<!-- readme-test: NAME -->` marker and run in a Python process of its own, with
stdin closed (as a user's job runs: a prompt would hang or fail). Only the names a test machine cannot reach
are swapped (the hub model id for a tiny local checkpoint, the hub data set for a local file, a shorter run);
every swapped text must still be in the block, so a README edit that changes what a user would run fails
here until this file follows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .tiny_models import alpaca_records, save_tiny

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HUB_MODEL = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
PROMPT = "Do you wish to run the custom code?"


def readme_block(name: str) -> str:
    """The ```python block that follows `<!-- readme-test: NAME`."""
    text = README.read_text(encoding="utf-8")
    marker = f"<!-- readme-test: {name}"
    assert text.count(marker) == 1, f"README.md has {text.count(marker)} '{marker}' markers, expected one"
    fence = text.index("```python\n", text.index(marker)) + len("```python\n")
    return text[fence: text.index("\n```", fence) + 1]


def adapted(name: str, swaps: dict[str, str]) -> str:
    code = readme_block(name)
    for old, new in swaps.items():
        assert old in code, f"README block {name!r} no longer contains {old!r}: update tests/test_readme.py"
        code = code.replace(old, new)
    return code


def run_user_script(cwd: Path, code: str, pythonpath: str = str(ROOT), timeout: int = 600):
    """`code` as a user's script: its own process, stdin closed, no terminal; hfprune from `pythonpath`."""
    script = cwd / "user_script.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_MODULES_CACHE": str(cwd / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    assert PROMPT not in result.stdout + result.stderr
    return result


def _tiny_checkpoint(path: Path) -> str:
    save_tiny("llama", path, max_position_embeddings=1024)  # the Alpaca prompt alone is ~150 tokens
    return repr(str(path))


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The Quick start, run once: its directory holds out/pruned; returns (directory, process result)."""
    work = tmp_path_factory.mktemp("quick_start")
    (work / "alpaca.json").write_text(json.dumps(alpaca_records(32)))
    code = adapted("quick-start", {
        HUB_MODEL: _tiny_checkpoint(work / "tiny-base"),
        'load_dataset("yahma/alpaca-cleaned", split="train")': 'load_dataset("json", data_files="alpaca.json", '
                                                               'split="train")',
        "max_steps=200": "max_steps=12",
    })
    check = textwrap.dedent("""
        from huggingface_hub import HfApi
        api = HfApi()
        print("PUSHED", sorted(api.list_repo_files(api.whoami()["name"] + "/out")))
    """)
    return work, run_user_script(work, code + check)


@pytest.mark.slow  # a training run in its own process (~30 s)
def test_the_quick_start_trains_saves_and_pushes_explaining_itself(quick_start):
    work, result = quick_start
    checkpoint = work / "out" / "pruned"
    report = json.loads((checkpoint / "pruning_report.json").read_text())
    assert report["reached"]["sparsity"] > 0.15
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["use_cache"] is True and config["auto_map"]  # heterogeneous: the remote-code path is real
    pushed = json.loads(result.stdout.split("PUSHED ", 1)[1].replace("'", '"'))
    assert {"config.json", "model.safetensors", "pruning_report.json", "README.md"} <= set(pushed)
    # log_level="info": the summary on the Trainer's log; 12 steps make a 6-step stage that cannot ramp
    assert "hfprune: pruning run" in result.stderr and "mask updates:" in result.stderr
    assert "removed in one jump" in result.stderr


@pytest.mark.slow  # two Python processes
def test_the_checkpoint_loads_as_the_readme_says_with_and_without_hfprune(quick_start):
    work, _ = quick_start
    check = textwrap.dedent("""
        import sys, torch
        ids = tokenizer("Join red and blue.", return_tensors="pt").input_ids
        assert torch.isfinite(model(ids).logits).all()
        print("LOADED", type(model).__name__, "hfprune" in sys.modules)
    """)
    result = run_user_script(work, readme_block("load-with-hfprune") + check)
    assert result.stdout.split("LOADED ", 1)[1].split()[1] == "True"

    absent = work / "no_hfprune"  # a machine where hfprune is not installed: importing it fails
    (absent / "hfprune").mkdir(parents=True)
    (absent / "hfprune" / "__init__.py").write_text("raise ImportError('hfprune is not installed here')\n")
    result = run_user_script(work, readme_block("load-without-hfprune") + check, pythonpath=str(absent))
    assert result.stdout.split("LOADED ", 1)[1].split()[1] == "False"  # the checkpoint's own code, no hfprune


@pytest.mark.slow  # a training run in its own process
def test_the_sft_trainer_block_saves_a_loadable_checkpoint_and_refuses_a_plain_save(tmp_path):
    prelude = textwrap.dedent("""
        import datasets
        from peft import LoraConfig
        from trl import SFTConfig
        from tests.tiny_models import alpaca_records, tiny_model, tiny_tokenizer

        model = tiny_model("llama")
        ds = datasets.Dataset.from_list([{"prompt": r["instruction"] + " ", "completion": r["output"]}
                                        for r in alpaca_records(32)])
        sft_config = SFTConfig(output_dir="sft", max_steps=6, per_device_train_batch_size=2, learning_rate=2e-3,
                               report_to=[], save_strategy="no", use_cpu=True, max_length=64)
        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    """)
    code = adapted("sft-callback", {"trainer = SFTTrainer(model=model,":
                                    "trainer = SFTTrainer(model=model, processing_class=tiny_tokenizer(),"})
    check = textwrap.dedent("""
        import torch
        from transformers import AutoModelForCausalLM
        import hfprune
        loaded = AutoModelForCausalLM.from_pretrained("out/pruned")
        assert torch.isfinite(loaded(torch.tensor([[5, 6, 7]])).logits).all()
        try:
            trainer.save_model()
        except RuntimeError as error:
            print("REFUSED", "callback.save_pruned(trainer, output_dir)" in str(error))
    """)
    result = run_user_script(tmp_path, prelude + code + check)
    assert "REFUSED True" in result.stdout
    assert (tmp_path / "out" / "pruned" / "tokenizer_config.json").is_file()


def test_the_one_shot_block_prunes_and_saves_without_training(tmp_path, data_dir):
    import shutil

    shutil.copy(data_dir / "c4_demo.jsonl", tmp_path)  # the block reads it from the working directory
    base = tmp_path / "tiny-base"
    save_tiny("llama", base)
    prelude = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained({str(base)!r})
        before = sum(p.numel() for p in model.parameters())
    """)
    check = textwrap.dedent("""
        import hfprune
        saved = AutoModelForCausalLM.from_pretrained("out")
        print("PARAMETERS", before, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in saved.parameters()))
    """)
    code = adapted("one-shot", {'original_checkpoint="org/model"': f"original_checkpoint={str(base)!r}"})
    result = run_user_script(tmp_path, prelude + code + check)
    before, after, saved = map(int, result.stdout.split("PARAMETERS ", 1)[1].split())
    assert saved == after < before


@pytest.mark.slow  # the real SmolLM2-135M-Instruct, trained a few steps
def test_the_sft_trainer_path_on_the_real_smollm2(tmp_path, smollm2_path, data_dir):
    prelude = textwrap.dedent(f"""
        import datasets
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig

        model = AutoModelForCausalLM.from_pretrained({str(smollm2_path)!r}, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained({str(smollm2_path)!r})
        records = datasets.load_dataset("json", data_files={str(data_dir / "alpaca_en_demo.json")!r},
                                        split="train").select(range(16))
        ds = records.map(lambda r: {{"messages": [{{"role": "user", "content": r["instruction"]}},
                                                {{"role": "assistant", "content": r["output"]}}]}},
                         remove_columns=records.column_names)
        sft_config = SFTConfig(output_dir="sft", max_steps=4, per_device_train_batch_size=2, learning_rate=1e-4,
                               report_to=[], save_strategy="no", use_cpu=True, max_length=64)
        lora_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    """)
    code = adapted("sft-callback", {
        "trainer = SFTTrainer(model=model,": "trainer = SFTTrainer(model=model, processing_class=tokenizer,",
        "PruningConfig(target_sparsity=0.2)": "PruningConfig(target_sparsity=0.2, prune_every=1)",
    })
    check = textwrap.dedent("""
        import json, torch
        import hfprune
        loaded = AutoModelForCausalLM.from_pretrained("out/pruned")
        ids = AutoTokenizer.from_pretrained("out/pruned")("The capital of France is", return_tensors="pt").input_ids
        assert torch.isfinite(loaded(ids).logits).all()
        report = json.load(open("out/pruned/pruning_report.json"))
        print("SPARSITY", report["reached"]["sparsity"])
    """)
    result = run_user_script(tmp_path, prelude + code + check)
    assert 0.15 < float(result.stdout.split("SPARSITY ", 1)[1].split()[0]) < 0.25
    assert "hfprune: pruning run" not in result.stderr  # SFTConfig's default log_level: the summary stays quiet
