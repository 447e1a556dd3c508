"""What SLURM says about our jobs and partitions, read with squeue and sinfo: no accounting, no submitit.

The launcher tracks its array tasks with ``squeue`` (slurmctld's own memory), never ``sacct``: many
clusters, and the one-node test cluster of ``scripts/slurm-cluster.sh``, run no slurmdbd, and there
``sacct`` answers "accounting storage is disabled" (submitit's default watcher would print its "Bypassing
sacct error" warning at every poll). slurmctld forgets a finished job ``MinJobAge`` seconds after its end
(300 s by default): a job squeue no longer lists is ``GONE``, i.e. over, and the run folder says how it ended.

``tlit grid status`` uses the same query, so this module imports nothing heavy (no torch, no submitit).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

GONE = "GONE"
"""The state of a job slurmctld no longer knows (finished more than MinJobAge seconds ago)."""
ALIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SUSPENDED",
        "STOPPED",
        "PREEMPTED",
    }
)
"""States of a job that will still run (or runs): a rerun must not submit its run again."""
INTERRUPTED = frozenset({"CANCELLED", "NODE_FAIL", "DEADLINE", "BOOT_FAIL", GONE})
"""Ends that are not the run's fault: the run resumes from its checkpoint next time."""
TIMEOUT_S = 30.0


def one_line(text: str) -> str:
    """SLURM's messages (often two lines: ``sbatch: error: ...`` twice) as one line."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def have_slurm() -> bool:
    return shutil.which("squeue") is not None


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """``{"123_4": "RUNNING", ...}`` for the given array tasks (``123_4``) or jobs (``123``), one squeue
    call; a job slurmctld no longer knows is ``GONE``. Empty when squeue is missing or does not answer
    (no state is better than a wrong one)."""
    wanted = sorted(set(job_ids))
    if not wanted or not have_slurm():
        return {}
    arrays = sorted({j.split("_")[0] for j in wanted})
    cmd = ["squeue", "--noheader", "--states=all", "--array", "--jobs", ",".join(arrays), "--format=%i|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        if "invalid job id" in out.stderr.lower():  # every one of them is forgotten: all gone
            return dict.fromkeys(wanted, GONE)
        return {}
    seen = parse_squeue(out.stdout)
    return {j: seen.get(j, GONE) for j in wanted}


def parse_squeue(text: str) -> dict[str, str]:
    """``123_4|RUNNING`` lines -> ``{"123_4": "RUNNING"}`` (squeue's ``--array`` lists tasks one per line)."""
    states = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            states[job] = state.split()[0].rstrip("+")
    return states


def partition_has_gpus(partition: str | None) -> bool:
    """Whether the nodes of ``partition`` (None: the default one) offer GPUs (``sinfo``'s gres column)."""
    cmd = ["sinfo", "--noheader", "--format=%P|%G"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    for line in out.splitlines():
        name, _, gres = line.partition("|")
        default = name.endswith("*")
        mine = (partition is None and default) or name.rstrip("*") == partition
        if mine and "gpu" in gres.lower():
            return True
    return False
