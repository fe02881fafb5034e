"""One process, a `device_map`: every weight of the pruned layers resident (here all on the CPU, the only device)
prunes and exports like a plain model; a pruned layer offloaded by accelerate (meta weights, loaded per forward) is
refused before any work; an offloaded protected layer is left alone and exported from the original."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfprune import PruningConfig, prune_model, removal
from hfprune.export import save_pruned

from .tiny_models import batch, save_tiny

pytest.importorskip("accelerate")


def _device_map(offloaded: dict) -> dict:
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placement.update({f"model.layers.{i}": offloaded.get(i, "cpu") for i in range(4)})
    return placement


def _load(tmp_path, offloaded: dict):
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=_device_map(offloaded),
                                                offload_folder=str(tmp_path / "offload"), dtype=torch.float32).eval()


def test_a_device_map_with_every_pruned_layer_resident_prunes_and_exports(tmp_path):
    save_tiny("llama", tmp_path / "base")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    config = PruningConfig(importance="magnitude", target_sparsity=0.3)  # layer 0 and the last one protected
    prune_model(reference, config)
    model = _load(tmp_path, {3: "disk"})  # the last (protected) layer offloaded
    assert model.hf_device_map["model.layers.3"] == "disk"
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    prune_model(model, config)
    assert removal.attached(model).masks == removal.attached(reference).masks
    out = save_pruned(model, tmp_path / "out", original_checkpoint=tmp_path / "base")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=batch()).logits, reference(input_ids=batch()).logits,
                                   atol=1e-5, rtol=1e-5)


def test_an_offloaded_pruned_layer_is_refused_before_work(tmp_path):
    save_tiny("llama", tmp_path / "base")
    model = _load(tmp_path, {2: "disk"})
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    with pytest.raises(ValueError, match=r"layer 2 .* is on the meta device: the device_map offloads it \(disk\).*"
                                         r"protected_layers"):
        prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.3))
    assert widths == [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert removal.attached(model) is None
