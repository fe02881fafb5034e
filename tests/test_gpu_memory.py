"""benchmarks/gpu_memory.py on the CPU: its quantized models are what from_pretrained(quantization_config=...)
builds, and its pruning steps run the engine to the physical removal, for every setup (no CUDA numbers here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from .tiny_models import FOUR_BIT_SIZES, save_tiny, tiny_model

pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_memory  # noqa: E402


@pytest.mark.parametrize("base", ["8bit", "4bit"])
def test_quantized_projections_are_the_ones_from_pretrained_builds(tmp_path, base):
    save_tiny("llama", tmp_path / "base", **FOUR_BIT_SIZES)
    if base == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                  device_map="cpu", dtype=torch.float32)
    built = tiny_model("llama", **FOUR_BIT_SIZES)
    assert gpu_memory.quantize_projections_(built, base) == 4 * 7
    assert getattr(built, f"is_loaded_in_{base}")
    for name, module in loaded.named_modules():
        if name.rsplit(".", 1)[-1] not in gpu_memory.common.LORA_TARGETS:
            continue
        mine = built.get_submodule(name)
        assert type(mine) is type(module)
        torch.testing.assert_close(mine.weight.data, module.weight.data, atol=0, rtol=0)
        if base == "8bit":
            torch.testing.assert_close(mine.weight.SCB, module.weight.SCB, atol=0, rtol=0)
        else:
            ours, theirs = mine.weight.quant_state, module.weight.quant_state
            assert (ours.quant_type, ours.blocksize, ours.nested, ours.shape) == (
                theirs.quant_type, theirs.blocksize, theirs.nested, theirs.shape)
            torch.testing.assert_close(ours.absmax, theirs.absmax, atol=0, rtol=0)
            assert mine.compute_dtype == module.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("setup", list(gpu_memory.SETUPS))
def test_every_setup_runs_its_pruning_steps_to_the_physical_removal(setup):
    run = gpu_memory.child(setup, "smoke", seq_len=32, batch_size=1, threads=1)
    assert run["physically_pruned"] and run["params_after"] < run["params_before"]
    assert [s["sliced"] for s in run["steps"]] == [False, False, True, True]  # sliced after the last pruning step
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in run["steps"])
    assert run["estimate"] > 0 and run["peak"] is None  # no CUDA here
    expected = gpu_memory.estimate(setup, gpu_memory._config("smoke"), 32, 1).total
    assert run["estimate"] == expected


def test_the_full_run_refuses_to_measure_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a GPU, or pass --smoke"):
        gpu_memory.main([])
