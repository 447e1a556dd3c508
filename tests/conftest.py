"""Shared test settings: tiny tensors on a 2-core machine run fastest on one thread (more only spin)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node SLURM cluster (tests/slurm_cluster.py): its slurm.conf, exported as SLURM_CONF."""
    from tests.slurm_cluster import cluster

    with cluster() as conf:
        yield conf


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` with ``options`` (mount needs root and CAP_SYS_ADMIN; the test skips
    without them), unmounted afterwards."""
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture()
def small_disk(tmp_path):
    """An 8 MB disk, for full-disk tests."""
    with tmpfs(tmp_path / "disk", "size=8m") as mount:
        yield mount
