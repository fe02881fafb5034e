"""Push a pruned checkpoint to the Hugging Face Hub: validated, with its model card, in one commit.

    from hfprune.hub import push_pruned
    url = push_pruned("out/", "me/llama-7b-pruned-20")

The directory is checked before any network call (config.json, safetensors weights,
pruning_report.json; pickles are refused). Every file goes up in a single commit, so the
repository shows either the whole new checkpoint or the old one; weight files of an
earlier push that the new checkpoint does not have are deleted in that same commit (a
stale `model.safetensors` beside a new sharded index would otherwise be loaded first).
Errors from the Hub become a `HubPushError` that names the repository and says what to do.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

from .atomic import recover_directory, write_bytes_atomic
from .model_source import PICKLE_SUFFIXES
from .model_card import (
    CARD_FILE, CHART_FILE, REPORT_FILE, card_files, card_metadata, generated_for, load_report, width_chart_png,
    write_card_files,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Never uploaded: hidden files (atomic-write leftovers, .git, .cache), bytecode, and what a Trainer
# leaves in its output_dir besides the model (checkpoints, TensorBoard runs).
IGNORED = (".*", "__pycache__", "*.pyc", "checkpoint-*", "runs")
# Files of an earlier push that must not survive beside the new checkpoint.
STALE_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl",
    "configuration_hfprune.py", "modeling_hfprune.py", CHART_FILE,
)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message names the repository and what to do.

    Attributes: `repo_id`, `status` (HTTP status, None for network errors).
    """

    def __init__(self, message: str, *, repo_id: str, status: Optional[int] = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status


# ---- validation ------------------------------------------------------------------------------------------


def checkpoint_files(checkpoint_dir: PathLike) -> list[str]:
    """The files of a pruned checkpoint that a push uploads (relative posix paths), after checking it.

    Raises:
        FileNotFoundError: not a directory, or config.json / safetensors weights / a listed shard /
            pruning_report.json / the remote code named in config.json's auto_map is missing.
        PickleCheckpointError (a ValueError): the directory holds pickle files (`*.bin`, `*.pt`, ...).
        ValueError: config.json, pruning_report.json or a safetensors index is not valid JSON.
    """
    from .model_source import PickleCheckpointError

    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint_dir={str(root)!r} is not a directory")
    files = _walk(root)
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PickleCheckpointError(
            f"{root} holds pickle files {pickles}: hfprune never uploads pickles (loading one can run arbitrary "
            "code). Weights must be safetensors; remove those files (training_args.bin, optimizer.pt, ... are "
            "training state, not part of the model) or export with hfprune.export.save_pruned"
        )
    config = _json(root / "config.json", "config.json", "the model config; write it with save_pruned or "
                   "model.save_pretrained")
    _json(root / REPORT_FILE, REPORT_FILE, "the pruning record; hfprune.export.save_pruned writes it")
    _check_weights(root, files)
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, (list, tuple)) else [reference]:
            if isinstance(ref, str) and "." in ref and "--" not in ref:
                module = ref.rsplit(".", 1)[0] + ".py"
                if module not in files:
                    raise FileNotFoundError(
                        f"{root}/config.json: auto_map points at {ref!r} but {module} is not in the directory; "
                        "the checkpoint would not load with trust_remote_code=True"
                    )
    return files


def _walk(root: Path) -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _ignored(d))
        for name in sorted(names):
            if not _ignored(name) and Path(directory, name).is_file():
                files.append(Path(directory, name).relative_to(root).as_posix())
    return files


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in IGNORED)


def _json(path: Path, name: str, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {name} ({what})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_weights(root: Path, files: list[str]) -> None:
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    for index in indexes:
        weight_map = _json(root / index, index, "the shard index").get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if f not in files})
        if missing:
            raise FileNotFoundError(f"{root / index} lists shards that are not in the directory: {missing}")
    if not any(f.endswith(".safetensors") for f in files):
        raise FileNotFoundError(
            f"{root} has no safetensors weights (model.safetensors or sharded model-*.safetensors + index)"
        )


# ---- push ------------------------------------------------------------------------------------------------


def push_pruned(
    checkpoint_dir: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
):
    """Upload the pruned checkpoint in `checkpoint_dir` to `repo_id` in a single commit.

    The directory is validated first (see `checkpoint_files`), before any network call. The model
    card (README.md) and the width chart go up with the checkpoint, unless it already has a card:
    a user's card is kept, and so is one hfprune wrote for this repo id (e.g. by
    `write_model_card(..., metadata=...)`); one hfprune wrote for another repo id, or none, is
    rendered again so its loading snippets name this repo. That card is rendered into the upload, and
    written into the directory only once the commit has succeeded: a failed push leaves the directory
    as it was. The repository is created if needed (`private` applies only then); `revision` is
    created as a branch from main if it does not exist.

    Args:
        token: a write token; default: `HF_TOKEN` or the one stored by `hf auth login`.
        revision: branch to commit to (default main); `create_pr=True` opens a pull request instead.

    Returns:
        The `CommitInfo` of the commit: a `str`, the commit URL (`.pr_url` with `create_pr=True`).

    Raises:
        FileNotFoundError / ValueError / PickleCheckpointError: an invalid checkpoint (nothing was sent).
        HubPushError: the Hub refused or failed; the message says why (401, 403, 404, 5xx) and what to do.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    if not isinstance(repo_id, str) or not repo_id.strip("/ "):
        raise ValueError(f"repo_id={repo_id!r}: expected 'namespace/name' (or 'name' for your own namespace)")
    root = Path(checkpoint_dir)
    recover_directory(root)  # an export killed half-way: finished or rolled back first
    checkpoint_files(root)  # before anything is sent

    api = HfApi(token=token)
    stale: list[str] = []
    try:
        if "/" not in repo_id:  # "name" -> "user/name", as create_repo would do
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        rendered = _rendered_card(root, repo_id)
        files = sorted(set(checkpoint_files(root)) | set(rendered))
        report = load_report(root)
        # Ask first: creating an existing repo is a 409 whose handling differs between Hub versions.
        if not api.repo_exists(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not revision.startswith("refs/pr/") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            remote = api.list_repo_files(repo_id, revision=revision)
        except RevisionNotFoundError:
            remote = []
        stale = sorted(
            f for f in remote if f not in files and any(fnmatch.fnmatchcase(f, p) for p in STALE_PATTERNS)
        )
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=rendered.get(f) or str(root / f))
                      for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or default_commit_message(report),
            commit_description=_commit_description(files, stale),
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as error:
        raise _push_error(error, repo_id, revision) from error
    except Exception as error:
        upload = _upload_error(error, repo_id)
        if upload is not None:
            raise upload from error
        if _is_network_error(error):
            from huggingface_hub import constants

            raise HubPushError(
                f"pushing to {repo_id!r} failed: could not reach the Hub at {api.endpoint or constants.ENDPOINT} "
                f"({type(error).__name__}: {error}). Nothing was committed; check the connection "
                "(and HF_ENDPOINT / HF_HUB_OFFLINE) and retry",
                repo_id=repo_id,
            ) from error
        raise
    logger.info("pushed %s (%d files; %d stale files deleted) to %s", root, len(files), len(stale), commit)
    try:  # the directory now shows the card the repository has
        if CARD_FILE in rendered:
            write_card_files(root, rendered)
        elif CHART_FILE in rendered:
            write_bytes_atomic(root / CHART_FILE, rendered[CHART_FILE])
    except OSError as error:
        logger.warning("pushed, but the card could not be written into %s: %s", root, error)
    return commit


def _rendered_card(root: Path, repo_id: str) -> dict[str, bytes]:
    """The card files the push uploads in place of the directory's own (see `push_pruned`), in memory."""
    card = root / CARD_FILE
    written_for = generated_for(card)
    if not card.is_file():
        return card_files(root, repo_id=repo_id)
    if written_for is not None and written_for != repo_id:
        # Its snippets name this repo; a caller's metadata is kept.
        return card_files(root, repo_id=repo_id, metadata=card_metadata(card))
    if f"({CHART_FILE})" in card.read_text(encoding="utf-8", errors="replace") and not (root / CHART_FILE).is_file():
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        chart = width_chart_png(load_report(root), config)
        return {CHART_FILE: chart} if chart is not None else {}
    return {}


def default_commit_message(report: dict) -> str:
    reached = report.get("reached") if isinstance(report.get("reached"), dict) else {}
    sparsity = reached.get("sparsity")
    criterion = report.get("criterion")
    message = "Upload pruned model"
    details = []
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        details.append(f"{100 * sparsity:.1f}% of prunable parameters removed")
    if isinstance(criterion, str) and criterion:
        details.append(f"criterion {criterion}")
    return message + (f" ({', '.join(details)})" if details else "")


def _commit_description(files: list[str], stale: list[str]) -> str:
    text = f"Pushed with hfprune: {len(files)} files."
    if stale:
        text += f" Removed from an earlier push: {', '.join(stale)}."
    return text


# ---- errors ----------------------------------------------------------------------------------------------


def _push_error(error, repo_id: str, revision: Optional[str]) -> HubPushError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = (getattr(error, "server_message", None) or "").strip()
    detail = f" The Hub said: {server}" if server else ""
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    head = f"pushing to {repo_id!r} failed"
    if status == 401:
        message = (
            f"{head} (401 Unauthorized): the token is missing or invalid. Log in with `hf auth login`, set "
            "HF_TOKEN to a token with write access, or pass token=... (create one at "
            "https://huggingface.co/settings/tokens)."
        )
    elif status == 403:
        where = f"the namespace {namespace!r}" if namespace else "your namespace"
        message = (
            f"{head} (403 Forbidden): this token has no write access to {where}. Use a write token (not a "
            "read-only or fine-grained token without write scope) of a user who may write there, e.g. a member of "
            "that organisation with write role, or push to your own namespace."
        )
    elif status == 404 or isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        if isinstance(error, RevisionNotFoundError):
            message = f"{head} (404 Not Found): revision {revision!r} does not exist in the repository."
        else:
            message = (
                f"{head} (404 Not Found): the repository or its namespace {namespace!r} was not found. Check the "
                "spelling; the namespace must be your user name or an organisation you belong to."
            )
    elif status is not None and status >= 500:
        message = (
            f"{head} (HTTP {status}): the Hub failed on its side. Commits are atomic, so nothing was committed "
            "and the repository is unchanged; retry later."
        )
    else:
        message = f"{head} (HTTP {status}): {error}"
        detail = ""
    return HubPushError(message + detail, repo_id=repo_id, status=status)


def _upload_error(error: BaseException, repo_id: str) -> Optional[HubPushError]:
    """huggingface_hub reports a failed LFS upload (after its retries) as a bare RuntimeError("Error while
    uploading 'FILE' to the Hub.") whose cause is the HTTP or network error: name the repo and the cause."""
    if not (isinstance(error, RuntimeError) and str(error).startswith("Error while uploading")):
        return None
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None)
    status = getattr(response, "status_code", None)
    what = str(error).removeprefix("Error while uploading ").removesuffix(" to the Hub.")
    reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause is not None else "no cause given"
    return HubPushError(
        f"pushing to {repo_id!r} failed while uploading {what} to the Hub's file storage (Git LFS): {reason}. "
        "Nothing was committed: the repository is unchanged; retry later, or check the connection to the Hub's "
        "storage",
        repo_id=repo_id, status=status,
    )


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
