"""What vLLM / SGLang read: uniform checkpoints are stock configs to the byte; heterogeneous ones keep
their widths in transformers' own `per_layer_config`, which the stock config classes parse."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from hfprune import PruningConfig, prune_model
from hfprune.export import save_pruned
from hfprune.structure import discover

from .tiny_models import ARCHITECTURES, tiny_model

RUN_KEYS = ("architectures", "model_type", "transformers_version")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_uniform_checkpoint_config_is_byte_for_byte_a_stock_config(arch, tmp_path):
    model = prune_model(tiny_model(arch), PruningConfig(target_sparsity=0.5, importance="magnitude", uniform=True,
                                                        protected_layers=()))
    save_pruned(model, tmp_path)
    text = (tmp_path / "config.json").read_text()
    written = json.loads(text)
    original = tiny_model(arch).config
    assert (written["num_attention_heads"], written["intermediate_size"]) != (
        original.num_attention_heads, original.intermediate_size)  # the widths did change

    # what the stock class writes for these widths, built from nothing but the stock class
    stock_class = type(AutoConfig.for_model(written["model_type"]))
    stock = stock_class(**{k: v for k, v in written.items() if k not in RUN_KEYS})
    stock.architectures = written["architectures"]
    assert text == stock.to_json_string(use_diff=True)
    assert written["model_type"] == original.model_type and written["architectures"] == [type(model).__name__]
    # only keys the stock class has; Qwen2Config declares no head_dim, but Qwen2's modeling reads config.head_dim
    assert set(written) - {"head_dim"} <= set(stock_class().to_dict())
    assert not [key for key in written if "hfprune" in key or key in ("per_layer_config", "auto_map")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == []  # no remote code
    assert written["num_attention_heads"] % written["num_key_value_heads"] == 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_heterogeneous_widths_are_transformers_per_layer_config(arch, tmp_path):
    model = prune_model(tiny_model(arch), PruningConfig(target_sparsity=0.4, importance="magnitude",
                                                        head_granularity="query_head", protected_layers=(0,)))
    save_pruned(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == f"hfprune_{ARCHITECTURES[arch]['model_type']}"
    # transformers' own (stock) config class parses it: the standard shape, nothing of ours inside
    stock_class = type(AutoConfig.for_model(ARCHITECTURES[arch]["model_type"]))
    values = {k: v for k, v in written.items() if k not in (*RUN_KEYS, "auto_map")}
    stock = stock_class(**values, allow_global_per_layer_attribute_access=True)
    layers = discover(model, protected_layers=()).layers
    assert len({(l.num_heads, l.intermediate_size) for l in layers}) > 1
    for index, layer in enumerate(layers):
        read = stock.per_layer_config[index]
        assert (read.num_attention_heads, read.num_key_value_heads, read.intermediate_size) == (
            layer.num_heads, layer.num_kv_heads, layer.intermediate_size)
    assert {name for widths in written["per_layer_config"].values() for name in widths} <= {
        "num_attention_heads", "num_key_value_heads", "intermediate_size"}
