"""Write a file so that readers, a crash or a full disk never leave half of it under its name.

The one way this project writes a file that others read (summaries, configs, checkpoints, tokenizers,
caches, locks): a temporary file in the same folder, written and ``fsync``-ed, optionally verified, then
renamed onto the name (``os.replace``, atomic on POSIX), and the folder ``fsync``-ed so that the rename
itself survives a power cut. A write that fails (``ENOSPC`` half-way, a failed verification, an exception
in the caller's block) removes its temporary file and leaves the old file, if any, as it was.

``exclusive=True`` publishes with ``os.link`` instead of ``os.replace``: it fails with ``FileExistsError``
when the name exists, so a lock file is created and written in one step (never seen empty by a reader).

No torch here: it is imported by the parts of the harness that must stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS)
"""link(2) errors of filesystems without hard links; exclusive writes then fall back to O_EXCL."""


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` for this process (hidden, so folder listings skip it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, verify: Callable[[Path], None] | None = None, exclusive: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; publish it when the block ends.

    On a clean exit the temporary file is flushed to disk, passed to ``verify`` (which raises if it is not
    what was meant to be written), and renamed onto ``path``. On any exception it is removed and ``path``
    is untouched.

    Args:
        path: the file to (re)write; its folder is created if missing.
        verify: called with the temporary path after ``fsync``; raise to refuse the file.
        exclusive: fail with ``FileExistsError`` instead of replacing an existing ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        if verify is not None:
            verify(tmp)
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _link_exclusive(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # no hard links: second best
        try:
            os.write(fd, tmp.read_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically and durably; returns ``path``."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, exclusive=exclusive) as tmp, open(tmp, "wb") as f:
        f.write(raw)
    return path


def write_atomic_all(files: Mapping[Path, bytes]) -> None:
    """Write every file, or none: each to its temporary name (fsynced) first, and only when all are written
    are they renamed into place. An ``OSError`` (a full disk names no file) is raised naming the file, and
    no file has been replaced."""
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            tmp = temps[path] = temp_name(path)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as err:
                raise OSError(err.errno, f"{err.strerror}; no output was replaced", str(path)) from None
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)
    for folder in {path.parent for path in temps}:
        fsync_dir(folder)
