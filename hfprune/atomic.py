"""Writes that never leave half a file or half a checkpoint behind.

Every file hfprune writes goes to a temporary name beside its target and is renamed into
place, so a reader (or a crash) sees the old version or the new one, never a mixture.
Checkpoint directories are built the same way by `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Files are world-readable like any checkpoint (mkstemp creates them 0600).
FILE_MODE = 0o644
DIRECTORY_MODE = 0o755


def _write_file_atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    """`write(tmp)` fills a temporary file in `path`'s directory, which is then renamed onto `path`: a reader
    sees the old file or the whole new one, and a failure leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    return _write_file_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> Path:
    """`safetensors.torch.save_file`, through a temporary file and a rename."""
    from safetensors.torch import save_file

    return _write_file_atomic(
        path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


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


def check_export_dir(
    export_dir: PathLike, training_dir: Optional[PathLike], what: str = "output_dir",
    training_what: str = "args.output_dir",
) -> None:
    """Refuse an export directory that is, or contains, the training run's output directory: an export
    replaces its directory whole, which would delete the run's checkpoints (and the run itself would fill
    it before the export, so even without overwrite the export could only fail, after training)."""
    if training_dir is None:
        return
    export, training = Path(export_dir).resolve(), Path(training_dir).resolve()
    if export != training and export not in training.parents:
        return
    relation = "is" if export == training else "contains"
    raise ValueError(
        f"{what}={str(export_dir)!r} {relation} {training_what}={str(training_dir)!r}, where the Trainer keeps its "
        "checkpoints: the export replaces its directory whole and would delete them. Export to a directory "
        f"outside it, e.g. {str(Path(training_dir) / 'pruned')!r}"
    )


# ---- checkpoint directories ---------------------------------------------------------------------------------
#
# `atomic_directory` builds a directory under a hidden name beside its target and swaps it into place:
#
#     .NAME.lock            held (flock) by the one writer, holds its pid; removed when it is done
#     .NAME.tmp-PID-ID      the new directory while it is written
#     .NAME.old-PID-ID      the old directory, only between the two renames of a swap without RENAME_EXCHANGE
#
# On Linux the swap is one atomic renameat2(RENAME_EXCHANGE): NAME holds the old checkpoint or the new one
# at every instant. Elsewhere it is two renames, NAME -> .old, .tmp -> NAME; a kill between them leaves no
# NAME, and the next writer (or `recover_directory`, which hfprune's loaders call) finishes that swap: the
# .old is moved aside only after the .tmp of the same ID is complete, so that .tmp goes into place. A
# writer that holds the lock knows no other hfprune writer is alive (the kernel drops the lock of a killed
# process), so it removes every .tmp and .old of NAME that earlier, killed writers left behind.


class DirectoryBusyError(BlockingIOError):
    """Another process is writing the same checkpoint directory (it holds `.NAME.lock` beside it)."""


def _hidden(output_dir: Path, kind: str, token: str = "") -> Path:
    return output_dir.parent / f".{output_dir.name}.{kind}{token}"


def _leftovers(output_dir: Path) -> list[Path]:
    """Temporary and old directories of earlier writers of `output_dir` (ours by name only)."""
    name = glob.escape(output_dir.name)
    found = []
    for kind in ("tmp", "old"):
        found += sorted(output_dir.parent.glob(f".{name}.{kind}-*"))
    return found


@contextlib.contextmanager
def directory_lock(output_dir: PathLike, what: str = "output_dir") -> Iterator[None]:
    """Hold the writer's lock of `output_dir` (`.NAME.lock` beside it) or raise `DirectoryBusyError`.

    Never waits: a second writer of the same directory is refused at once, before it has written anything.
    Without `fcntl` (Windows) there is no lock and concurrent writers are not detected.
    """
    output_dir = Path(output_dir)
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    path = _hidden(output_dir, "lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DirectoryBusyError(
                f"{what}={str(output_dir)!r} is being written by another process (pid {holder}, which holds "
                f"{path.name}): wait for it to finish, or write to another directory"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed that file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        # Removed while still held: whoever opened it meanwhile finds it gone and locks a new file.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _recover(output_dir: Path) -> None:
    """With the lock held: finish a swap a killed writer left half-done, then remove the leftovers."""
    if not output_dir.exists():
        for old in sorted(output_dir.parent.glob(f".{glob.escape(output_dir.name)}.old-*")):
            new = _hidden(output_dir, "tmp-", old.name.rsplit(".old-", 1)[1])
            if new.is_dir():  # complete: the old directory is moved aside only after the new one is written
                os.rename(new, output_dir)
                logger.warning("%s: finished the replacement a killed writer had begun", output_dir)
            else:
                os.rename(old, output_dir)
                logger.warning("%s: restored the directory a killed writer had moved aside", output_dir)
            break
    for leftover in _leftovers(output_dir):
        logger.info("removing %s, left by a writer that was killed", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def recover_directory(output_dir: PathLike) -> None:
    """Finish or roll back an interrupted `atomic_directory` swap of `output_dir` and remove the temporary
    directories killed writers left beside it. Does nothing while a writer is at work, and writes nothing
    when there is nothing to recover (a read-only parent is fine). hfprune calls it before it reads a
    local checkpoint (the CLI, `push_pruned`, `PruningTrainer(model=path)`)."""
    output_dir = Path(output_dir)
    stale = _leftovers(output_dir) or _hidden(output_dir, "lock").exists()
    if not stale or not os.access(output_dir.parent, os.W_OK):
        return
    try:
        with directory_lock(output_dir):
            _recover(output_dir)
    except DirectoryBusyError:
        return


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        _renameat2 = None  # this kernel or file system cannot: two renames from now on
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = _load_renameat2()


def _swap_into_place(tmp: Path, output_dir: Path, token: str) -> None:
    if not output_dir.exists():
        try:
            os.rename(tmp, output_dir)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} was filled by another program while this checkpoint was "
                "written; nothing was replaced. Write to another directory"
            ) from None
        return
    if _exchange(tmp, output_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # the old directory, now under the temporary name
        return
    old = _hidden(output_dir, "old-", token)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(output_dir: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir`; on success it replaces `output_dir`.

    On any error the temporary directory is removed and `output_dir` is left as it was. A second writer of
    the same directory gets `DirectoryBusyError` at once; leftovers of killed writers are recovered or
    removed first (see above).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(output_dir):
        _recover(output_dir)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = _hidden(output_dir, "tmp-", token)
        tmp.mkdir(mode=DIRECTORY_MODE)
        os.chmod(tmp, DIRECTORY_MODE)
        try:
            yield tmp
            check_output_dir(output_dir, overwrite)  # nobody filled it meanwhile
            _swap_into_place(tmp, output_dir, token)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
