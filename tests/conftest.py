"""Shared test settings: tiny tensors on a 2-core machine run fastest on one thread (more only spin)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node SLURM cluster (tests/slurm_cluster.py): its slurm.conf, exported as SLURM_CONF."""
    from tests.slurm_cluster import cluster

    with cluster() as conf:
        yield conf


@pytest.fixture()
def small_disk(tmp_path):
    """An 8 MB tmpfs (mount needs root and CAP_SYS_ADMIN); unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
