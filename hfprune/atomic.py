"""Writes that never leave half a file or half a checkpoint behind.

Every file hfprune writes goes to a temporary name beside its target and is renamed into
place, so a reader (or a crash) sees the old version or the new one, never a mixture.
Checkpoint directories are built the same way by `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# Files are world-readable like any checkpoint (mkstemp creates them 0600).
FILE_MODE = 0o644
DIRECTORY_MODE = 0o755


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> Path:
    """`safetensors.torch.save_file`, through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (e.g. gguf's GGUFWriter);
    on success it is renamed onto `path`, on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output_dir(output_dir: PathLike, overwrite: bool, what: str = "output_dir") -> None:
    """A target directory may be written when it is absent, empty, or `overwrite` is set."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{what}={str(output_dir)!r} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{what}={str(output_dir)!r} exists and is not empty; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_directory(output_dir: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir`; on success it replaces `output_dir`.

    On any error the temporary directory is removed and `output_dir` is left as it was.
    """
    output_dir = Path(output_dir)
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    os.chmod(tmp, DIRECTORY_MODE)
    try:
        yield tmp
        check_output_dir(output_dir, overwrite)  # nobody filled it meanwhile
        if output_dir.exists():
            old = parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(output_dir, old)
            try:
                os.rename(tmp, output_dir)
            except BaseException:
                os.rename(old, output_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
