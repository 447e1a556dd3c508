"""Errors the command line reports in one line (no traceback). No torch import."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops and its last good checkpoint is kept."""
