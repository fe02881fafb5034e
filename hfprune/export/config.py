"""The config.json of a pruned checkpoint.

Uniform: every decoder layer has the same widths. The checkpoint gets a stock config of
its family (same `model_type` and architecture) with the pruned widths and an explicit
`head_dim`, and loads everywhere without remote code.

Heterogeneous: layers differ. The config is the family's hfprune config
(`model_type: "hfprune_llama"`, ...) whose global widths are the unpruned ones and whose
`per_layer_config` lists the layers pruning narrowed; `auto_map` points at the modeling
code shipped in the checkpoint. With hfprune imported the same classes are registered, so
no remote code runs.

Widths are read from the modules' shapes (hfprune.structure), never from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig

from ..structure import ModelStructure
from .remote_code.configuration_hfprune import PER_LAYER_WIDTHS, PRUNED_CONFIG_CLASSES

# Keys of the in-memory config that describe the training run, not the exported weights.
_DROPPED_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "quantization_config",
    "pruned_layer_widths",
    "per_layer_config",
    "allow_global_per_layer_attribute_access",
    "serialize_explicit_per_layer_config",
    "_name_or_path",
    "dtype",
    "torch_dtype",
)

# Training switches these off (gradient checkpointing needs use_cache=False); a checkpoint is for inference.
_INFERENCE_DEFAULTS = {"use_cache": True}

# What a stock config raises for widths it rejects (transformers 5 validates with @strict).
_CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)

REMOTE_CODE_FILES = ("configuration_hfprune.py", "modeling_hfprune.py")


@dataclass
class ExportConfig:
    """The config to write, and whether the checkpoint needs hfprune's modeling code."""

    config: PretrainedConfig
    heterogeneous: bool
    reason: str  # why this format was chosen, for the report


def base_model_type(config: PretrainedConfig) -> str:
    """The stock family: `llama` for both a LlamaConfig and an hfprune_llama config."""
    return getattr(config, "base_model_type", None) or config.model_type


def layer_widths(structure: ModelStructure) -> list[dict[str, int]]:
    return [layer.widths() for layer in structure]


def _describe(widths: dict[str, int]) -> str:
    return ", ".join(f"{name}={widths[name]}" for name in PER_LAYER_WIDTHS)


def _group_layers(widths: list[dict[str, int]]) -> str:
    groups: dict[tuple, list[int]] = {}
    for index, w in enumerate(widths):
        groups.setdefault(tuple(w[name] for name in PER_LAYER_WIDTHS), []).append(index)
    parts = []
    for key, layers in groups.items():
        label = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers}"
        parts.append(f"{label}: {_describe(dict(zip(PER_LAYER_WIDTHS, key)))}")
    return "; ".join(parts)


def _global_dict(config: PretrainedConfig) -> dict:
    """The config as a dict of the unpruned (global) values, run-specific keys dropped, inference defaults set."""
    d = config.to_dict()
    for key in _DROPPED_KEYS:
        d.pop(key, None)
    d.update({key: value for key, value in _INFERENCE_DEFAULTS.items() if key in d})
    return d


def _stock_config_class(model_type: str):
    return type(AutoConfig.for_model(model_type))


def _valid_head_counts(family: str, values: dict, widths: dict[str, int]) -> list[int]:
    """Query-head counts (at most the original) a stock config of this family accepts."""
    valid = []
    for heads in range(1, values["num_attention_heads"] + 1):
        try:  # one KV head divides any head count, so only the family's own rule can refuse
            _stock_config(family, {**values, **widths, "num_attention_heads": heads, "num_key_value_heads": 1})
        except _CONFIG_ERRORS:
            continue
        valid.append(heads)
    return valid


def _stock_config(model_type: str, values: dict) -> PretrainedConfig:
    return _stock_config_class(model_type).from_dict(values)


def build_export_config(
    config: PretrainedConfig,
    structure: ModelStructure,
    *,
    uniform: Optional[bool],
    dtype: torch.dtype,
    architecture: str,
) -> ExportConfig:
    """The config of the exported checkpoint.

    uniform=None: stock config when all layers share widths a stock config accepts, else
    heterogeneous. uniform=True: stock config or ValueError (saying which widths differ and
    which would be valid). uniform=False: always the heterogeneous (hfprune_*) format.
    """
    family = base_model_type(config)
    values = _global_dict(config)
    values["head_dim"] = structure.layers[0].head_dim
    widths = layer_widths(structure)
    same = all(w == widths[0] for w in widths)

    if uniform is False:
        reason = "uniform=False was requested"
    elif not same:
        reason = f"the decoder layers have different widths ({_group_layers(widths)})"
        if uniform:
            raise ValueError(
                f"uniform=True: {reason}; a stock config has one set of widths for every layer: prune every layer "
                "alike (PruningConfig(uniform=True, protected_layers=())), or save with uniform=None to write a "
                "heterogeneous checkpoint (per_layer_config + shipped modeling code)"
            )
    else:
        try:
            stock = _stock_config(family, {**values, **widths[0]})
        except _CONFIG_ERRORS as error:
            detail = str(error).strip().splitlines()[-1].strip().removeprefix("ValueError: ").rstrip(".")
            reason = f"a stock {family} config rejects the uniform widths {_describe(widths[0])}: {detail}"
            if uniform:
                valid = _valid_head_counts(family, values, widths[0])
                raise ValueError(
                    f"uniform=True: {reason}. With hidden_size={values['hidden_size']} it accepts "
                    f"num_attention_heads in {valid} (and a multiple of num_key_value_heads; "
                    "PruningConfig(round_heads_to=...) can land on one), or save with uniform=None to write a "
                    "heterogeneous checkpoint"
                ) from None
        else:
            stock.architectures = [architecture]
            stock.dtype = dtype
            return ExportConfig(stock, heterogeneous=False, reason="every decoder layer has the same widths")

    if family not in PRUNED_CONFIG_CLASSES:
        raise ValueError(
            f"model_type={family!r}: heterogeneous pruned checkpoints are supported for "
            f"{sorted(PRUNED_CONFIG_CLASSES)}; prune {family} uniformly (PruningConfig(uniform=True)) to get a "
            "stock config"
        )
    config_class = PRUNED_CONFIG_CLASSES[family]
    from .remote_code.modeling_hfprune import PRUNED_MODEL_CLASSES

    model_class = PRUNED_MODEL_CLASSES[family]
    values["per_layer_config"] = {
        index: {name: w[name] for name in PER_LAYER_WIDTHS if w[name] != values[name]}
        for index, w in enumerate(widths)
        if any(w[name] != values[name] for name in PER_LAYER_WIDTHS)
    }
    pruned = config_class.from_dict(values)
    pruned.architectures = [model_class.__name__]
    pruned.auto_map = {
        "AutoConfig": f"configuration_hfprune.{config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_hfprune.{model_class.__name__}",
    }
    pruned.dtype = dtype
    return ExportConfig(pruned, heterogeneous=True, reason=reason)
