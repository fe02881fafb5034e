"""Trainer checkpoints of a pruning run: which are complete, and which one a resume takes.

A checkpoint of a pruning run has two halves: the Trainer's files, of which `trainer_state.json` is
written last (`Trainer._save_checkpoint`), and hfprune's `pruning_state.safetensors` (scores, masks,
what was sliced). `PruningTrainer` writes its half first, so `trainer_state.json` marks a checkpoint
whose both halves are there, and the Trainer rotates older checkpoints away only after that;
`PruningCallback` in any other Trainer writes its half in `on_save`, after the Trainer's. A process
killed in between leaves a `checkpoint-N` with one half only. Resuming from it would start pruning
afresh on a model whose training had moved on (different final masks), or, after the weights were
sliced, load sliced weights into an unsliced model; so a resume takes the newest *complete* checkpoint
(`last_complete_checkpoint`), and `PruningTrainer` removes the incomplete ones above it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

STATE_FILE = "pruning_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR

PathLike = Union[str, os.PathLike]


def checkpoint_problem(directory: PathLike) -> Optional[str]:
    """Why `directory` is not a complete checkpoint of a pruning run (None when it is one): a half that is
    missing or does not read back."""
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        return "no such directory"
    trainer_state = directory / TRAINER_STATE_FILE
    if not trainer_state.is_file():
        return f"it has no {TRAINER_STATE_FILE}"
    try:
        json.loads(trainer_state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"its {TRAINER_STATE_FILE} does not read back ({type(error).__name__}: {error})"
    state = directory / STATE_FILE
    if not state.is_file():
        return f"it has no {STATE_FILE}"
    try:
        with safe_open(str(state), framework="pt") as handle:
            handle.metadata()
    except Exception as error:  # safetensors raises its own error types for a truncated or corrupt file
        return f"its {STATE_FILE} does not read back ({type(error).__name__}: {error})"
    return None


def checkpoints(folder: PathLike) -> list[Path]:
    """The `checkpoint-N` directories in `folder`, newest (highest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder)
             if (m := _CHECKPOINT.match(name)) and (folder / name).is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(folder: PathLike) -> Optional[Path]:
    """The newest complete checkpoint in `folder` (see the module docstring), None if there is none."""
    return next((path for path in checkpoints(folder) if checkpoint_problem(path) is None), None)


def incomplete_checkpoints(folder: PathLike) -> dict[Path, str]:
    """The checkpoints newer than the newest complete one, each with what it lacks."""
    found = {}
    for path in checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            break
        found[path] = problem
    return found


def checkpoint_to_resume(folder: PathLike, resume_from_checkpoint: Union[bool, PathLike], discard: bool) -> str:
    """The checkpoint a resume takes: a given path if it is complete (ValueError naming the newest complete
    one otherwise), or for `True` the newest complete one in `folder`. With `discard`, the incomplete
    checkpoints above it are removed: the Trainer would write into them again as it passes their steps."""
    if resume_from_checkpoint is True:
        skipped = incomplete_checkpoints(folder)
        last = last_complete_checkpoint(folder)
        if last is None:
            detail = "; ".join(f"{p.name}: {why}" for p, why in skipped.items())
            raise ValueError(
                f"resume_from_checkpoint=True: {str(folder)!r} holds no complete checkpoint"
                + (f" ({detail}; killed while writing?)" if detail else "")
                + ": start afresh (resume_from_checkpoint=None) or pass the path of one"
            )
        for path, why in skipped.items():
            logger.warning("%s is incomplete (%s: killed while writing it?); resuming from %s instead",
                           path, why, last.name)
            if discard:
                shutil.rmtree(path, ignore_errors=True)
        return str(last)
    path = Path(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None:
        last = last_complete_checkpoint(path.parent)
        instead = f"resume from {str(last)!r}, the newest complete one" if last else "no complete checkpoint is beside it"
        raise ValueError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint of a pruning run: "
            f"{problem} (killed while writing it?); {instead}"
        )
    return str(path)
