"""The one-node SLURM cluster of ``scripts/slurm-cluster.sh``, for the tests marked ``slurm``.

The session fixture in ``conftest.py`` uses a cluster that is already up (``.ci/run`` starts one), or starts
one itself where it can (root, and the packages or apt-get to install them) and stops it afterwards. Where
it cannot, the tests skip with one line; under ``CI=true`` they fail instead, so a CI machine that lost its
cluster cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-cluster.sh"


def _script(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def _cannot_start() -> str | None:
    """Why this machine cannot start the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "no SLURM packages and no apt-get to install them"
    return None


def _unavailable(reason: str) -> None:
    line = f"no SLURM cluster: {reason} (scripts/slurm-cluster.sh up)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {line}", pytrace=False)
    pytest.skip(line)


@contextmanager
def cluster() -> Iterator[Path]:
    """Yields the cluster's slurm.conf path (exported as ``SLURM_CONF``); stops only a cluster it started."""
    started = False
    if _script("status").returncode != 0:
        reason = _cannot_start()
        if reason:
            _unavailable(reason)
        up = _script("up")
        if up.returncode != 0:
            lines = (up.stderr or up.stdout).strip().splitlines() or ["no output"]
            _unavailable(f"start failed: {lines[-1]}")
        started = True
    conf = Path(_script("conf").stdout.strip())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            yield conf
        finally:
            if started:
                _script("down")


def squeue(job: str) -> dict[str, str]:
    """``{task id: state}`` of a job's tasks that slurmctld still knows (``123_4`` -> ``RUNNING``)."""
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-r", "-j", job, "-o", "%i|%T"], capture_output=True, text=True
    ).stdout
    return dict(line.split("|", 1) for line in out.split())


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
