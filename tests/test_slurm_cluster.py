"""The one-node SLURM cluster that the ``slurm`` tests submit to (scripts/slurm-cluster.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.slurm_cluster import SCRIPT, squeue, wait_for


@pytest.mark.slurm
def test_up_again_is_a_no_op_and_a_job_completes(slurm_cluster: Path, tmp_path: Path):
    again = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stderr, again.stderr
    out = tmp_path / "out.txt"
    job = subprocess.run(
        ["sbatch", "--parsable", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for(lambda: squeue(job).get(job) == "COMPLETED", 30, f"job {job} to complete")
    assert out.read_text().strip() == f"hello from {job}"


@pytest.mark.slurm
def test_there_is_no_accounting(slurm_cluster: Path):
    """The launcher must track jobs without sacct (the cluster runs no slurmdbd)."""
    sacct = subprocess.run(["sacct", "-j", "1"], capture_output=True, text=True)
    assert "accounting storage is disabled" in (sacct.stderr + sacct.stdout).lower()


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_root_the_tests_skip_in_one_line_but_fail_under_ci(tmp_path: Path, monkeypatch, ci: str):
    from tests import slurm_cluster as SC

    monkeypatch.setenv("TLIT_SLURM_DIR", str(tmp_path))  # no cluster there: status fails
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(SC.os, "geteuid", lambda: 1000)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected) as err, SC.cluster():
        pass
    assert str(err.value.msg).count("\n") == 0 and "needs root" in str(err.value.msg)
    assert not list(tmp_path.iterdir())  # nothing was started
