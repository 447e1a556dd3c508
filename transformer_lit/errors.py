"""Errors the command line reports in one line (no traceback). No torch import."""

from __future__ import annotations

import os


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops and its last good checkpoint is kept."""


def no_gpu_message(what: str, instead: str) -> str:
    """The one line of every GPU request on a machine without one (``--devices cuda:...``,
    ``train.accelerator=gpu``)."""
    return f"{what}: no GPU is visible here; use {instead}"


def os_error_line(err: OSError) -> str:
    """``/ro/runs/table3: Read-only file system``: the path first, then why (OSError's own text puts an
    ``[Errno 30]`` first and may leave the path out)."""
    what = err.strerror or str(err)
    if isinstance(err, FileExistsError) and err.filename and os.path.isfile(err.filename):
        what = "a file is there, where a folder belongs"
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {what}" if paths else what
