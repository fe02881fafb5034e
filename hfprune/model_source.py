"""Where a model is read from: a local checkpoint directory (safetensors only) or a hub id.

`check_model_source(name_or_path, what)` runs before anything is loaded, wherever hfprune takes a
model by name (`PruningTrainer(model=...)`, a recipe's `model.name_or_path`, `hfprune eval`):

  * a local directory: an interrupted hfprune export there is finished or rolled back first
    (`hfprune.atomic.recover_directory`); pickle weights are refused (`PickleCheckpointError`);
  * something that cannot be a hub id (an absolute or dotted path, more than one "/") and does not
    exist: `FileNotFoundError` naming it, instead of the hub client's complaint about repo ids;
  * anything else is a hub id, left to `from_pretrained`.

A pickle (`*.bin`, `*.pt`, ...) can run code when it is loaded, so a checkpoint that holds one is
refused before anything is read, never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PathLike = Union[str, os.PathLike]


class PickleCheckpointError(ValueError):
    """A checkpoint holds (or points to) pickle files, which hfprune never loads."""


def check_no_pickles(path: PathLike) -> None:
    """Raise `PickleCheckpointError` if the checkpoint at `path` holds or references pickle files.

    `path` is a checkpoint directory (or a single `.safetensors` file). Nothing is opened
    but JSON indexes; no file is unpickled.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise PickleCheckpointError(f"{path}: only .safetensors weights are read (hfprune never unpickles)")
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    # Top level only, where transformers looks for weights (hub repos may keep e.g. original/*.pth aside).
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleCheckpointError(
            f"{path} contains pickle files {pickles}: hfprune never loads pickles (they can run code). Convert the "
            "checkpoint to safetensors (e.g. load it once where you trust it and `save_pretrained(..., "
            "safe_serialization=True)`), or point to a directory holding only safetensors weights"
        )
    for index_file in path.glob("*.index.json"):
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        referenced = sorted({f for f in weight_map.values() if not str(f).endswith(".safetensors")})
        if referenced:
            raise PickleCheckpointError(
                f"{index_file} references non-safetensors weight files {referenced}: hfprune never loads pickles"
            )


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repo id ('name' or 'namespace/name')."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_source(name_or_path: PathLike, what: str = "model") -> str:
    """Check a model given by name before it is loaded (see the module docstring); returns it as a string."""
    from .atomic import recover_directory

    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}={name_or_path!r}: expected a checkpoint directory or a hub id ('namespace/name')")
    recover_directory(name)
    if os.path.isdir(name):
        check_no_pickles(name)
        return name
    if os.path.exists(name):
        raise ValueError(f"{what}={name!r} is a file: expected a checkpoint directory (config.json and "
                         "*.safetensors) or a hub id ('namespace/name')")
    if not is_hub_id(name):
        raise FileNotFoundError(
            f"{what}={name!r}: no such directory, and not a hub id ('namespace/name'); give a checkpoint directory "
            "(config.json and *.safetensors) or the id of a model on the hub"
        )
    return name
