"""Errors the command line reports in one line (no traceback). No torch import."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops and its last good checkpoint is kept."""


def no_gpu_message(what: str, instead: str) -> str:
    """The one line of every GPU request on a machine without one (``--devices cuda:...``,
    ``train.accelerator=gpu``)."""
    return f"{what}: no GPU is visible here; use {instead}"
