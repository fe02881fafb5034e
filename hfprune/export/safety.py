"""Checks that keep an export honest: no pickles read, and shapes that match the config.

hfprune reads and writes safetensors only. A pickle (`*.bin`, `*.pt`, ...) can run code
when it is loaded, so a checkpoint that holds one is refused before anything is read,
never opened. `validate_checkpoint_shapes` compares the widths a config promises with
the shapes in the safetensors headers, without loading a tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from safetensors import safe_open

# The pickle refusal sits below every layer (PruningTrainer(model=path) needs it too); re-exported here.
from ..model_source import PICKLE_SUFFIXES, PickleCheckpointError, check_no_pickles  # noqa: F401

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def safetensors_files(path: Union[str, Path]) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order (index first, then a single file)."""
    path = Path(path)
    index_file = path / SAFETENSORS_INDEX
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_file} lists shards that are not in {path}: {missing}")
        return [path / f for f in files]
    if (path / SAFETENSORS_SINGLE).is_file():
        return [path / SAFETENSORS_SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; hfprune reads safetensors only")


def read_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def config_layer_widths(config: dict, index: int) -> dict:
    """Widths of decoder layer `index`: the global ones, overridden by `per_layer_config`."""
    widths = {
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "intermediate_size": config["intermediate_size"],
    }
    per_layer = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}
    widths.update({k: v for k, v in per_layer.get(index, {}).items() if k in widths})
    return widths


def validate_checkpoint_shapes(path: Union[str, Path]) -> None:
    """Raise ValueError naming the layer and tensor if config.json's widths contradict the weights.

    Reads config.json and the safetensors headers (no tensor is loaded). Checks every
    decoder layer's q/k/v/o and gate/up/down projections (and biases) against the
    layer's heads, KV heads, head_dim and intermediate size.
    """
    from ..structure import get_architecture

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    spec = get_architecture(model_type.removeprefix("hfprune_"))
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    shapes = read_shapes(path)
    for index in range(config["num_hidden_layers"]):
        widths = config_layer_widths(config, index)
        q_rows = widths["num_attention_heads"] * head_dim
        kv_rows = widths["num_key_value_heads"] * head_dim
        inter = widths["intermediate_size"]
        prefix = f"{spec.layers}.{index}"
        attention, mlp = f"{prefix}.{spec.attention}", f"{prefix}.{spec.mlp}"
        expected = {
            f"{attention}.{spec.q_proj}.weight": (q_rows, hidden),
            f"{attention}.{spec.k_proj}.weight": (kv_rows, hidden),
            f"{attention}.{spec.v_proj}.weight": (kv_rows, hidden),
            f"{attention}.{spec.o_proj}.weight": (hidden, q_rows),
            f"{mlp}.{spec.gate_proj}.weight": (inter, hidden),
            f"{mlp}.{spec.up_proj}.weight": (inter, hidden),
            f"{mlp}.{spec.down_proj}.weight": (hidden, inter),
        }
        optional = {
            f"{attention}.{spec.q_proj}.bias": (q_rows,),
            f"{attention}.{spec.k_proj}.bias": (kv_rows,),
            f"{attention}.{spec.v_proj}.bias": (kv_rows,),
            f"{mlp}.{spec.gate_proj}.bias": (inter,),
            f"{mlp}.{spec.up_proj}.bias": (inter,),
        }
        overridden = {int(k) for k in config.get("per_layer_config") or {}}
        source = f"per_layer_config[{index}]" if index in overridden else "global config"
        described = (
            f"num_attention_heads={widths['num_attention_heads']}, "
            f"num_key_value_heads={widths['num_key_value_heads']}, "
            f"intermediate_size={widths['intermediate_size']}, head_dim={head_dim}, hidden_size={hidden} ({source})"
        )
        for name, shape in expected.items():
            if name not in shapes:
                raise ValueError(f"layer {index}: tensor {name} is missing from the weights of {path}")
            if shapes[name] != shape:
                raise ValueError(
                    f"layer {index}: tensor {name} has shape {list(shapes[name])} but config.json says "
                    f"{described}, i.e. shape {list(shape)}"
                )
        for name, shape in optional.items():
            if name in shapes and shapes[name] != shape:
                raise ValueError(
                    f"layer {index}: tensor {name} has shape {list(shapes[name])} but config.json says "
                    f"{described}, i.e. shape {list(shape)}"
                )
