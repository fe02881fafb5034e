"""The published configs of the supported large models, and a model built from a config on the meta device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Folder with the published ``config.json`` of the supported large models.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


def available_model_configs() -> list[str]:
    """Short names of the configs shipped in ``hfprune/model_configs``."""
    if not MODEL_CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: Any):
    """A transformers config from a short name, a json file, a folder, a dict or a hub id.

    Short names are the files in ``hfprune/model_configs`` (``"llama-65b"``,
    ``"llama-2-70b"``, ...); anything else goes to ``AutoConfig.from_pretrained``.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return AutoConfig.for_model(**dict(name_or_path))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"config={name_or_path!r}: expected a PretrainedConfig, a dict, a short name, a path or a hub id"
        )
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return AutoConfig.from_pretrained(text)
    short = text.lower().removesuffix(".json")
    if (MODEL_CONFIG_DIR / f"{short}.json").is_file():
        config = AutoConfig.from_pretrained(str(MODEL_CONFIG_DIR / f"{short}.json"))
        config.name_or_path = short
        return config
    if "/" not in text:
        raise ValueError(
            f"config={text!r}: not a file, and not one of the shipped configs "
            f"{available_model_configs()}; pass a path, a hub id ('org/name') or a config"
        )
    return AutoConfig.from_pretrained(text)


def build_meta_model(config):
    """The full-size model with every tensor on the meta device (no memory, no initialisation).

    A heterogeneous config (``per_layer_config``) of a stock family is built with hfprune's
    pruned-model class of that family, which gives each narrowed layer its own widths: the stock
    modeling reads only the global ones (and refuses a global read of a per-layer width).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..export.registration import register_auto_classes

    register_auto_classes()  # hfprune_<family> configs (heterogeneous exports) build with their own class
    model_class = _pruned_model_class(config)
    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        return AutoModelForCausalLM.from_config(config)


def _pruned_model_class(config):
    if not getattr(config, "is_heterogeneous", False):
        return None
    from ..export.remote_code.modeling_hfprune import PRUNED_MODEL_CLASSES

    return PRUNED_MODEL_CLASSES.get(getattr(config, "model_type", None))
