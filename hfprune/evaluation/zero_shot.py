"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model.

The model and tokenizer are wrapped in lm-eval's ``HFLM`` as they are, so a
physically pruned model (whose config no longer describes its layers) is
evaluated without a round trip through ``from_pretrained``.

Offline use: ``task_dir`` is a directory of lm-eval task YAMLs (passed to
``TaskManager(include_path=...)``) whose ``dataset_path: json`` and
``dataset_kwargs.data_files`` point to local files. Relative ``data_files``
are resolved by ``datasets`` against the working directory, so prefer absolute
paths in your own tasks.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Sequence

import torch

from ..quiet import drop_messages

# The seven commonsense tasks reported by LLM-Pruner and LoRAPrune.
ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ACCURACY_METRICS = ("acc", "acc_norm")
# lm-eval requests are a few hundred tokens at most: 16 a forward pass costs a GPU little memory and saves it most
# of its time; on one CPU thread it still saves a quarter (SmolLM2, 200 PIQA requests: 33 s -> 25 s CPU time).
ZERO_SHOT_BATCH_SIZE = 16


# lm-eval warnings about how hfprune calls it, not about the user's model or tasks: an in-memory model
# is passed on purpose (a pruned one could not be reloaded from its config), in one process; and
# num_fewshot=0 over a task default of None changes nothing.
_LM_EVAL_NOISE = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.evaluator": (re.compile(r"Overwriting default num_fewshot of \S+ from None to 0$"),),
}


def _quiet_lm_eval() -> None:
    for logger_name, messages in _LM_EVAL_NOISE.items():
        drop_messages(logger_name, *messages)


def _git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, without git's "fatal: not a git repository" on stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())
    return done.stdout.strip()


@contextlib.contextmanager
def _quiet_git_lookup() -> Iterator[None]:
    """`simple_evaluate` records the working directory's git commit by running `git describe`, whose
    complaint outside a repository lands on the user's terminal; the same lookup, quietly, for the call."""
    import lm_eval.evaluator

    original = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval version: nothing to quieten
        yield
        return
    lm_eval.evaluator.get_git_commit_hash = _git_commit_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def _task_manager(tasks: Sequence[str], task_dir: str | os.PathLike | None):
    from lm_eval.tasks import TaskManager

    if task_dir is None:
        return TaskManager()
    if not os.path.isdir(task_dir):
        raise FileNotFoundError(f"task_dir={str(task_dir)!r}: not a directory of lm-eval task YAMLs")
    # Indexing lm-eval's ~15k built-in YAMLs takes tens of seconds; skip it
    # when the local directory already defines every requested task.
    local = TaskManager(include_path=str(task_dir), include_defaults=False)
    if all(name in local.all_tasks for name in tasks):
        return local
    return TaskManager(include_path=str(task_dir))


def _check_tasks(tasks: Sequence[str], manager) -> None:
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        local = [name for name in manager.all_tasks if name in ZERO_SHOT_TASKS]
        raise ValueError(
            f"tasks={unknown!r}: unknown to lm-eval; e.g. {', '.join(local or ZERO_SHOT_TASKS)}, "
            "or a task defined in task_dir"
        )


def accuracies(results: dict, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {"acc": .., "acc_norm": ..}}`` from a ``simple_evaluate`` result.

    lm-eval keys metrics as ``"<metric>,<filter>"``; the zero-shot tasks here
    use the ``none`` filter. Metrics a task does not report (boolq has no
    ``acc_norm``) are left out.
    """
    table = {}
    for task in tasks:
        metrics = results["results"].get(task, {})
        table[task] = {
            metric: float(metrics[f"{metric},none"]) for metric in ACCURACY_METRICS if f"{metric},none" in metrics
        }
    return table


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = ZERO_SHOT_TASKS,
    batch_size: int | str = ZERO_SHOT_BATCH_SIZE,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    task_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on lm-eval ``tasks``: ``{task: {"acc": .., "acc_norm": ..}}``.

    ``limit`` caps the examples per task (for quick checks only; reported
    numbers use the full sets). ``batch_size`` requests go through one forward pass (lm-eval sorts them by
    length), or ``"auto"``: the largest that fits the GPU, as lm-eval finds it. ``max_length`` overrides the
    context length lm-eval would read from the config.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks=[]: name at least one lm-eval task, e.g. " + ", ".join(ZERO_SHOT_TASKS))
    manager = _task_manager(tasks, task_dir)
    _check_tasks(tasks, manager)

    was_training = model.training
    model.eval()
    try:
        with _quiet_git_lookup():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,  # stderr bootstraps cost minutes and are not reported
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    return accuracies(results, tasks)
