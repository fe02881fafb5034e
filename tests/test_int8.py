"""Physical removal on bitsandbytes 8-bit bases (CPU): int8 rows/columns and row scales sliced
directly, equal to the masked base; the same under a peft LoRA wrapper."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hfprune import PruningConfig, apply_masks, discover, remove_pruned_groups
from hfprune.allocation import allocate
from hfprune.importance import ScoreAccumulator, get_importance
from hfprune.importance import score_model

from .tiny_models import batch, save_tiny

pytest.importorskip("bitsandbytes")


def _load_8bit(path):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu", dtype=torch.float32
    ).eval()


def _masks(structure):
    accumulator = ScoreAccumulator(normalize=False)
    criterion = get_importance("random")
    criterion.seed = 5
    score_model(structure, criterion, accumulator)
    config = PruningConfig(head_sparsity=0.5, channel_sparsity=0.3, protected_layers=(0,))
    return allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)


@pytest.mark.parametrize("with_lora", [False, True])
def test_int8_physical_removal_equals_masked(tmp_path, with_lora):
    save_tiny("llama", tmp_path / "base")
    model = _load_8bit(tmp_path / "base")
    if with_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        model.eval()
    structure = discover(model, protected_layers=(0,))
    q_proj = structure.layers[1].projection("q_proj")
    int8 = q_proj.base_layer if with_lora else q_proj
    assert type(int8).__name__ == "Linear8bitLt" and int8.weight.dtype == torch.int8
    masks = _masks(structure)
    ids = batch()
    with torch.no_grad():
        model(input_ids=ids)  # the first forward moves the row scales into the layer state
        hooks = apply_masks(structure, masks)
        masked = model(input_ids=ids).logits
        hooks.remove()
        int8_before = int8.weight.data.clone()
    remove_pruned_groups(structure, masks)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    # the int8 values were sliced, not re-quantised
    kept_rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in masks[1].heads.nonzero().squeeze(1).tolist()])
    assert int8.weight.dtype == torch.int8
    assert torch.equal(int8.weight.data, int8_before[kept_rows])
    assert int8.state.SCB.shape[0] == len(kept_rows)


def test_the_int8_cast_warning_is_logged_once(caplog):
    """bitsandbytes warns on every int8 matmul with fp32 inputs; after the filter (callback, prune_model), once."""
    import logging

    from hfprune.bnb_logging import quiet_int8_cast_warning

    quiet_int8_cast_warning()
    quiet_int8_cast_warning()  # idempotent: one filter
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(bnb_logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        for _ in range(3):
            bnb_logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "float32")
        bnb_logger.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("MatMul8bitLt") for m in messages) <= 1 and "something else" in messages
