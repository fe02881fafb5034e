"""The estimate of a 4-bit base (bitsandbytes NF4/FP4, QLoRA-style): counted by hand, and against real
`Linear4bit` layers on the CPU."""

from __future__ import annotations

import pytest
import torch

from hfprune.estimate import GiB, estimate_memory
from hfprune.structure import PROJECTION_ROLES

# hidden 128, intermediate 256, 2 layers, 4 heads of 32, 2 KV heads: every size bitsandbytes' CPU kernels take
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY)


def test_4bit_weights_counted_by_hand():
    # per layer: q, o 128x128; k, v 64x128; gate, up, down 256x128 (out x in)
    sizes = [128 * 128, 64 * 128, 64 * 128, 128 * 128, 256 * 128, 256 * 128, 256 * 128]
    # two 4-bit codes a byte, one fp32 absmax per 64 weights, the 16-entry fp32 NF4 code book
    plain = [n // 2 + (n // 64) * 4 + 16 * 4 for n in sizes]
    assert plain == [9280, 4672, 4672, 9280, 18496, 18496, 18496]
    # double quantization: uint8 absmax, an fp32 absmax per 256 of them, an fp32 offset, a 256-entry fp32 code book
    nested = [n // 2 + n // 64 + -(-(n // 64) // 256) * 4 + 4 + 256 * 4 + 16 * 4 for n in sizes]
    assert nested == [9544, 5320, 5320, 9544, 17996, 17996, 17996]
    estimate = estimate_memory(tiny_config(), criterion="activation_taylor", load_in_4bit=True)
    assert estimate.components["base_weights"] == 2 * sum(plain) == 166784
    nested_estimate = estimate_memory(tiny_config(), criterion="activation_taylor", load_in_4bit=True,
                                      double_quant=True)
    assert nested_estimate.components["base_weights"] == 2 * sum(nested) == 167432
    # what stays unquantised is fp32 after prepare_model_for_kbit_training, as with 8 bits
    eight_bit = estimate_memory(tiny_config(), criterion="activation_taylor", load_in_8bit=True)
    other = 2 * 300 * 128 + 5 * 128  # embeddings, LM head, 2 norms a layer and the final one
    assert estimate.components["other_weights"] == eight_bit.components["other_weights"] == 4 * other
    assert estimate.settings["load_in_4bit"] and not estimate.settings["load_in_8bit"]
    assert "4-bit base" in estimate.to_markdown()


def test_4bit_backward_dequantises_to_the_compute_dtype():
    """One layer's backward holds the largest weight de-quantised: bf16 (4-bit) against fp32 (int8, prepared)."""
    eight = estimate_memory("llama-7b", criterion="activation_taylor", load_in_8bit=True)
    four = estimate_memory("llama-7b", criterion="activation_taylor", load_in_4bit=True)
    largest = 11008 * 4096
    assert (eight.components["layer_backward_workspace"] - four.components["layer_backward_workspace"]
            == largest * (4 - 2))
    # the lora criterion reads the weight: the 4-bit matrix de-quantised once more, beside its fp32 work buffers
    lora_four = estimate_memory("llama-7b", criterion="lora", load_in_4bit=True)
    assert lora_four.components["importance_workspace"] == largest * (3 * 4 + 2)
    assert four.components["importance_workspace"] == 0  # activation_taylor reads no weight


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_4bit_estimate_matches_real_linear4bit_layers(tmp_path, double_quant):
    """A tiny Llama loaded in 4-bit on the CPU, prepared for k-bit training, LoRA r=8 on the 7 projections:
    the packed weights and quantization states, and the tensors autograd saves, are the estimate's."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .test_estimate import _count_saved_activations

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.bfloat16)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7

    def stored(module) -> int:
        state = module.weight.quant_state
        tensors = [module.weight, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    estimate = estimate_memory(tiny_config(), criterion="lora", load_in_4bit=True, double_quant=double_quant,
                               seq_len=64, lora_r=8, gradient_checkpointing=False)
    assert sum(stored(m) for m in four_bit) == estimate.components["base_weights"]

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(PROJECTION_ROLES), lora_dropout=0.0)).train()
    counted = _count_saved_activations(model, torch.randint(0, 300, (1, 64)))
    first_norm, log_softmax = 4 * 64 * 128 + 4 * 64, 4 * 64 * 300  # as for the 8-bit model
    assert estimate.components["saved_activations"] - first_norm + log_softmax == pytest.approx(counted, rel=0.001)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"criterion": "taylor", "load_in_4bit": True},
         r"criterion='taylor' with load_in_4bit=True: .*full gradients, and bitsandbytes 4-bit weights are packed"),
        ({"criterion": "lora", "load_in_4bit": True, "load_in_8bit": True},
         r"load_in_8bit=True with load_in_4bit=True: choose one"),
        ({"criterion": "lora", "double_quant": True}, r"double_quant=True without load_in_4bit=True"),
    ],
)
def test_4bit_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("smollm2-135m", **kwargs)


def test_4bit_targets_of_issue_13():
    """From the estimator: Llama-3-8B under 16 GiB, Llama-3.1-70B under 48 GiB (seq 512, batch 1, checkpointing)."""
    for criterion in ("activation_taylor", "lora"):
        assert estimate_memory("llama-3-8b", criterion=criterion, load_in_4bit=True).total < 16 * GiB
        assert estimate_memory("llama-3.1-70b", criterion=criterion, load_in_4bit=True, double_quant=True).total \
            < 48 * GiB
    assert estimate_memory("llama-3.1-70b", criterion="activation_taylor", load_in_4bit=True).total < 48 * GiB
