"""Shared test settings: tiny tensors on a 2-core machine run fastest on one thread (more only spin)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node SLURM cluster (tests/slurm_cluster.py): its slurm.conf, exported as SLURM_CONF."""
    from tests.slurm_cluster import cluster

    with cluster() as conf:
        yield conf
