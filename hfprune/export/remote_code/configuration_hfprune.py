"""Configuration of a checkpoint pruned by hfprune whose decoder layers have different widths.

Shipped next to the weights (with `modeling_hfprune.py`) so that the checkpoint loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` where hfprune is not
installed; with hfprune imported, the same classes are registered and no remote code runs.

Each class is the stock configuration of its family. The global widths are the original
model's; the layers pruning narrowed carry theirs in transformers' `per_layer_config`:

    "per_layer_config": {"1": {"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 2816}}

`head_dim` is always explicit: pruning removes whole heads, never part of one.
Imports only transformers.
"""

from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

PER_LAYER_WIDTHS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class HfprunePrunedConfigMixin:
    """Per-layer validation in place of the stock one.

    Stock Llama and Gemma configs require `hidden_size % num_attention_heads == 0` even with an
    explicit `head_dim`; a pruned layer keeps `head_dim` and only has fewer heads, so what must
    hold is per layer: heads divide into KV heads (grouped-query attention), widths >= 1.
    """

    base_model_type = None  # the stock model_type this config extends

    def validate_architecture(self):
        head_dim = self.__dict__.get("head_dim")
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim={head_dim!r}: a pruned checkpoint needs an explicit head_dim >= 1")
        for index in range(self.num_hidden_layers):
            layer = self.per_layer_config[index]
            heads, kv_heads = layer.num_attention_heads, layer.num_key_value_heads
            if kv_heads < 1 or heads < kv_heads or heads % kv_heads:
                raise ValueError(
                    f"layer {index}: num_attention_heads={heads} with num_key_value_heads={kv_heads}: the query heads "
                    "must be a positive multiple of the key/value heads"
                )
            if layer.intermediate_size < 1:
                raise ValueError(f"layer {index}: intermediate_size={layer.intermediate_size}: must be >= 1")


class HfpruneLlamaConfig(HfprunePrunedConfigMixin, LlamaConfig):
    model_type = "hfprune_llama"
    base_model_type = "llama"


class HfpruneMistralConfig(HfprunePrunedConfigMixin, MistralConfig):
    model_type = "hfprune_mistral"
    base_model_type = "mistral"


class HfpruneQwen2Config(HfprunePrunedConfigMixin, Qwen2Config):
    model_type = "hfprune_qwen2"
    base_model_type = "qwen2"


class HfpruneQwen3Config(HfprunePrunedConfigMixin, Qwen3Config):
    model_type = "hfprune_qwen3"
    base_model_type = "qwen3"


class HfpruneGemma2Config(HfprunePrunedConfigMixin, Gemma2Config):
    model_type = "hfprune_gemma2"
    base_model_type = "gemma2"


class HfpruneGemma3TextConfig(HfprunePrunedConfigMixin, Gemma3TextConfig):
    model_type = "hfprune_gemma3_text"
    base_model_type = "gemma3_text"


PRUNED_CONFIG_CLASSES = {
    cls.base_model_type: cls
    for cls in (
        HfpruneLlamaConfig,
        HfpruneMistralConfig,
        HfpruneQwen2Config,
        HfpruneQwen3Config,
        HfpruneGemma2Config,
        HfpruneGemma3TextConfig,
    )
}
