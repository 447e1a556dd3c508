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
import sys
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


# ----------------------------------------------------------------------------------------------------------
# Driving tlit against the cluster, as a user would (a real CLI process; the tasks inherit PYTHONPATH)

ROOT = Path(__file__).resolve().parents[1]
MICRO_SCALE = {
    "description": "tens of steps on 2 shared CPU cores (the slurm tests)",
    "divide": 8,
    "steps": 1.0,
    "set": {
        "data.corpus": "synthetic",
        "data.synthetic_pairs": 300,
        "data.synthetic_eval_pairs": 20,
        "data.synthetic_max_words": 10,
        "data.vocab_size": 1000,
        "data.max_tokens": 480,
        "model.num_layers": 1,
        "optim.warmup_steps": 50,
        "train.val_every_n_steps": 10,
        "train.checkpoint_every_n_steps": 10,
        "train.log_every_n_steps": 10,
        "train.wandb": False,
        "eval.max_sentences": 20,
    },
}


def write_grid(folder: Path, rows: dict[str, dict], name: str = "micro") -> Path:
    """A grid file with the micro scale inline; each row sets its own ``train.max_steps``."""
    import yaml

    doc = {
        "name": name,
        "default_scale": "micro",
        "scales": {"micro": MICRO_SCALE},
        "rows": {row: {"label": row, **cells} for row, cells in rows.items()},
    }
    path = folder / f"{name}.yaml"
    path.write_text(f"# tlit grid run {path} --launcher slurm\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def tlit(*args: str, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``tlit ARGS`` in ``cwd`` (sbatch's working directory for the tasks, which inherit PYTHONPATH)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tlit_background(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=cwd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def our_jobs() -> set[str]:
    """Array (or job) ids slurmctld knows, finished ones included."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%F"], capture_output=True, text=True).stdout
    return set(out.split())


def cancel_all(job_ids) -> None:
    """Cancel what a test submitted (cleanup: the next test gets both CPUs)."""
    ids = sorted({str(j).split("_")[0] for j in job_ids})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
        wait_for(
            lambda: (
                not any(
                    squeue(j) and set(squeue(j).values()) & {"RUNNING", "COMPLETING", "PENDING"} for j in ids
                )
            ),
            60,
            f"jobs {ids} to end",
        )
