"""Modeling of a checkpoint pruned by hfprune whose decoder layers have different widths.

Each class is the stock causal LM of its family (so weight loading, `generate`, the KV cache,
`device_map="auto"` and bitsandbytes quantization behave as for the unpruned model) with one
change: a decoder layer listed in `config.per_layer_config` is built from that layer's config,
at its pruned widths. Nothing else differs; no network access, no side effects at import.
Imports only torch and transformers.
"""

import contextlib
import logging

from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_hfprune import (
    HfpruneGemma2Config,
    HfpruneGemma3TextConfig,
    HfpruneLlamaConfig,
    HfpruneMistralConfig,
    HfpruneQwen2Config,
    HfpruneQwen3Config,
)


@contextlib.contextmanager
def _global_widths(config):
    """Let the stock constructor read the global (original) widths of a heterogeneous config.

    transformers raises on a global read of a per-layer attribute unless it is allowed; the
    stock model reads them once while building, and every layer read there is rebuilt below.
    """
    allowed = config.__dict__.get("allow_global_per_layer_attribute_access")
    heterogeneity_logger = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = heterogeneity_logger.level
    config.allow_global_per_layer_attribute_access = True
    heterogeneity_logger.setLevel(logging.ERROR)  # the "reading a global value" warning is expected here
    try:
        yield
    finally:
        heterogeneity_logger.setLevel(level)
        if allowed is None:
            config.__dict__.pop("allow_global_per_layer_attribute_access", None)
        else:
            config.allow_global_per_layer_attribute_access = allowed


def pruned_layer_indices(config):
    """Indices of the decoder layers whose per-layer attributes differ from the global config."""
    if not config.is_heterogeneous:
        return []
    names = sorted(config.per_layer_attributes)
    with _global_widths(config):
        global_values = {name: getattr(config, name) for name in names}
    return [
        index
        for index in range(config.num_hidden_layers)
        if any(getattr(config.per_layer_config[index], name) != global_values[name] for name in names)
    ]


def rebuild_pruned_layers(decoder: nn.Module, config) -> None:
    """Replace each decoder layer listed in `per_layer_config` by one built at its own widths.

    The new layer's modules keep a reference to the model's config (not the per-layer copy
    they were built from), so later changes such as `set_attn_implementation` reach them; their
    widths live in their weights' shapes and in attributes like `num_key_value_groups`.
    """
    for index in pruned_layer_indices(config):
        old = decoder.layers[index]
        layer_config = config.per_layer_config[index]
        new = type(old)(layer_config, index)
        for module in new.modules():
            if getattr(module, "config", None) is layer_config:
                module.config = config
        decoder.layers[index] = new


class HfprunePrunedLayersMixin:
    """Build the stock model at the original widths, then swap in the pruned layers.

    Inside `from_pretrained` the model is created on the meta device, so the original-width
    layers cost no memory; the weights are then loaded into the pruned shapes.
    """

    def __init__(self, config, *args, **kwargs):
        with _global_widths(config):
            super().__init__(config, *args, **kwargs)
        rebuild_pruned_layers(self.get_decoder(), config)
        self.post_init()  # initializes only the new layers' weights (the others are marked initialized)


class HfpruneLlamaForCausalLM(HfprunePrunedLayersMixin, LlamaForCausalLM):
    config_class = HfpruneLlamaConfig


class HfpruneMistralForCausalLM(HfprunePrunedLayersMixin, MistralForCausalLM):
    config_class = HfpruneMistralConfig


class HfpruneQwen2ForCausalLM(HfprunePrunedLayersMixin, Qwen2ForCausalLM):
    config_class = HfpruneQwen2Config


class HfpruneQwen3ForCausalLM(HfprunePrunedLayersMixin, Qwen3ForCausalLM):
    config_class = HfpruneQwen3Config


class HfpruneGemma2ForCausalLM(HfprunePrunedLayersMixin, Gemma2ForCausalLM):
    config_class = HfpruneGemma2Config


class HfpruneGemma3ForCausalLM(HfprunePrunedLayersMixin, Gemma3ForCausalLM):
    config_class = HfpruneGemma3TextConfig


PRUNED_MODEL_CLASSES = {
    cls.config_class.base_model_type: cls
    for cls in (
        HfpruneLlamaForCausalLM,
        HfpruneMistralForCausalLM,
        HfpruneQwen2ForCausalLM,
        HfpruneQwen3ForCausalLM,
        HfpruneGemma2ForCausalLM,
        HfpruneGemma3ForCausalLM,
    )
}
