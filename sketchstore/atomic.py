"""Atomic writes: a file or directory is written beside its target under a hidden temporary
name, flushed to disk, and renamed into place only when complete. A crash at any point
leaves either the old content or the new, never half of it, and no temporary file behind
(except after SIGKILL, when a hidden ``.NAME.*.tmp`` may remain; it is never read)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

ON_EXISTS = ("replace", "keep", "error")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under ``root``."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def temp_name(path: Path) -> Path:
    """The hidden temporary sibling a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.{os.getpid()}-{time.time_ns()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a handle on a temporary sibling of ``path``; on success it is fsynced and renamed onto
    ``path`` (replacing it), on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path``'s content with ``text`` atomically."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, on_exists: str = "replace") -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it is fsynced and renamed to
    ``final``, on any error it is removed. When ``final`` exists by then: ``replace`` swaps it out
    (the old one is deleted after the rename), ``keep`` keeps the existing one and discards the new
    one (another writer finished first), ``error`` raises FileExistsError. The directory gets the
    permissions a plain ``mkdir`` would give (``mkdtemp`` makes it private)."""
    if on_exists not in ON_EXISTS:
        raise ValueError(f"on_exists must be one of {ON_EXISTS}, got {on_exists!r}")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        fsync_tree(tmp)
        _rename_dir(tmp, final, on_exists)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def _rename_dir(tmp: Path, final: Path, on_exists: str) -> None:
    if final.exists() and on_exists == "error":
        raise FileExistsError(f"{final} already exists")
    if final.exists() and on_exists == "keep":
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
