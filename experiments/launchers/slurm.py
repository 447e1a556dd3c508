"""The SLURM launcher: the same jobs submitted through submitit as job arrays, one task per run.

Each run is one array task holding ``train.devices`` GPUs on one node; inside it, ``TrainTask`` takes the
run's lock (on the compute node), starts the same ``tlit train`` command as the local launcher, retries a
failure ``retries`` times, and marks a run failed with its log tail. On preemption or timeout SLURM sends
USR2; submitit then calls ``TrainTask.checkpoint``, which stops the training process, releases the lock and
resubmits the task: the run resumes from its last checkpoint (``checkpoints/last.ckpt``).

Data: ``tlit grid run`` prepares every run's data on the submitting node before this launcher submits
the array (``experiments.runs.prepare``), so tasks only map it; ``data.cache_dir`` (default
``results/cache``, relative to the folder the jobs run in) must be on a filesystem every node sees. A run
whose data is missing fails there, in one line, before anything is submitted.

The cluster is always chosen explicitly: submitit's AutoExecutor would pick SLURM whenever an ``sbatch``
binary exists (docs/DESIGN.md field notes). ``cluster="slurm"`` submits for real; ``"local"`` and ``"debug"``
run the same tasks on this machine (tests). ``sbatch_script`` renders the exact sbatch text that would
be submitted, without a cluster (checked against ``tests/golden/sbatch/``).

Inside a task, Lightning must not treat the single SLURM task as its DDP world (it would wait for k srun
tasks): the training process gets the environment without ``SLURM_NTASKS``, so Lightning's own launcher
starts the k ranks on the node's k GPUs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.launchers import base as B
from experiments.runs import folder as F
from experiments.runs import locks

log = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local", "debug")


def _skipped(message: str) -> dict[str, Any]:
    """The result of a task that had nothing to train."""
    return {"state": B.JobState.SKIPPED.value, "attempts": 0, "seconds": 0.0, "message": message}


@dataclass
class SlurmOptions:
    """Resources of one array task (one run); the GPU count comes from the run's ``train.devices``.

    Attributes:
        folder: Where submitit keeps its pickles and logs (must be on a shared filesystem).
        partition: SLURM partition (None: the cluster's default).
        time_min: Wall time limit per task, in minutes; a run that needs longer is requeued and resumes.
        mem_gb: Memory per task in GB (None: the partition's default).
        cpus_per_gpu: CPU cores per GPU (data loading, tokenisation).
        gpus: Ask for ``train.devices`` GPUs per task (False: CPU-only tasks of ``train.devices`` cores).
        array_parallelism: Array tasks running at once.
        max_requeues: Timeouts after which a run is not requeued any more (preemptions do not count).
        extra: Any other sbatch option (``{"account": "x", "qos": "high"}``).
    """

    folder: Path = Path("results/slurm")
    partition: str | None = None
    time_min: int = 24 * 60
    mem_gb: float | None = None
    cpus_per_gpu: int = 8
    gpus: bool = True
    array_parallelism: int = 64
    max_requeues: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def sbatch_parameters(opts: SlurmOptions, slots: int, name: str) -> dict[str, Any]:
    """Parameters of ``submitit.SlurmExecutor.update_parameters`` for tasks of ``slots`` devices."""
    params: dict[str, Any] = {
        "job_name": name,
        "time": opts.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": opts.cpus_per_gpu * slots if opts.gpus else slots,
        "signal_delay_s": 120,
        "array_parallelism": opts.array_parallelism,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **opts.extra},
    }
    if opts.gpus:
        params["gpus_per_node"] = slots
    if opts.partition:
        params["partition"] = opts.partition
    if opts.mem_gb is not None:
        params["mem"] = opts.mem_gb
    return params


def sbatch_script(opts: SlurmOptions, slots: int, name: str, tasks: int, python: str | None = None) -> str:
    """The sbatch file submitit writes for an array of ``tasks`` runs (no cluster needed)."""
    from submitit.slurm import slurm as S

    params = sbatch_parameters(opts, slots, name)
    if "mem" in params:
        params["mem"] = S._convert_mem(params["mem"])
    python = python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(opts.folder))])
    return S._make_sbatch_string(command=command, folder=opts.folder, map_count=tasks, **params)


HIDDEN_FROM_LIGHTNING = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")
"""Without these, Lightning does not take the one SLURM task for its DDP world and spawns its own ranks."""


class TrainTask:
    """The callable submitit runs for each array task: one run, with lock, retries and requeue.

    Checkpointable the submitit way (a ``__call__`` and a ``checkpoint`` that resubmits itself); the
    model state lives in the run folder's checkpoints, not in this object.
    """

    def __init__(self, retries: int = 1, lock_timeout: float = locks.DEFAULT_STALE_AFTER, poll: float = 1.0):
        self.retries = retries
        self.lock_timeout = lock_timeout
        self.poll = poll
        self.attempts = 0
        self._proc: Any = None
        self._lock: locks.RunLock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None, _lock=None)

    def __call__(self, job: B.Job) -> dict[str, Any]:
        start = time.time()
        if B.is_complete(job):
            return _skipped("already complete")
        lock = locks.RunLock(job.run_dir, stale_after=self.lock_timeout, note={"run": job.name})
        while not lock.acquire():  # another grid runs it: wait for it (within this task's time)
            if B.is_complete(job):
                return _skipped("completed by another grid")
            time.sleep(max(self.poll, 5.0))
        self._lock = lock
        try:
            return self._attempts(job, start)
        finally:
            lock.release()
            self._lock = None

    def _attempts(self, job: B.Job, start: float) -> dict[str, Any]:
        if B.is_complete(job):
            return {
                "state": B.JobState.SKIPPED.value,
                "attempts": 0,
                "seconds": 0.0,
                "message": "completed by another grid",
            }
        message = ""
        while self.attempts <= self.retries:
            self.attempts += 1
            where = f"{locks.hostname()} slurm job {os.environ.get('SLURM_JOB_ID', '?')}"
            fd = B.open_log(job, self.attempts, self.retries + 1, where)
            try:
                self._proc = B.spawn(
                    job, {"PYTHONUNBUFFERED": "1", B.LOCK_HELD_ENV: "1"}, fd, drop=HIDDEN_FROM_LIGHTNING
                )
                while self._proc.poll() is None:
                    assert self._lock is not None
                    self._lock.heartbeat()
                    time.sleep(self.poll)
                rc = self._proc.returncode
            finally:
                os.close(fd)
                self._proc = None
            if rc == 0 and B.is_complete(job):
                return {
                    "state": B.JobState.DONE.value,
                    "attempts": self.attempts,
                    "seconds": time.time() - start,
                    "message": "",
                }
            message = B.failure_message(rc, job.run_dir)
            B.append_log(job, f"attempt {self.attempts} failed: {message}")
            if rc == B.USER_ERROR_EXIT:
                break
        F.mark_failed(job.run_dir, message, B.log_tail(job.log_path))
        return {
            "state": B.JobState.FAILED.value,
            "attempts": self.attempts,
            "seconds": time.time() - start,
            "message": message,
        }

    def checkpoint(self, job: B.Job) -> Any:
        """Preempted or timed out: stop training (it resumes from its checkpoint), free the run, requeue."""
        from submitit.helpers import DelayedSubmission

        if self._proc is not None:
            B.terminate([self._proc], grace=60.0)
            self.attempts = max(0, self.attempts - 1)  # a preemption is not a failed attempt
        if self._lock is not None:
            self._lock.release()
        B.append_log(job, "preempted or timed out; requeued, resumes from its last checkpoint")
        return DelayedSubmission(self, job)


class SlurmLauncher(B.Launcher):
    """Submits jobs as SLURM job arrays (one array per GPU count) and, by default, waits for them.

    Args:
        options: Resources of each task.
        cluster: ``slurm`` for real; ``local`` or ``debug`` run the tasks here (tests).
        retries: Attempts after a failure, inside the task.
        wait: Wait for the tasks and return their results; False returns PENDING results at once.
        poll: Seconds between two looks at the tasks.
    """

    kind = "slurm"

    def __init__(
        self,
        options: SlurmOptions,
        *,
        cluster: str = "slurm",
        retries: int = 1,
        lock_timeout: float = locks.DEFAULT_STALE_AFTER,
        wait: bool = True,
        poll: float = 10.0,
        name: str = "tlit",
    ) -> None:
        if cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {cluster!r}")
        self.options, self.cluster, self.retries = options, cluster, retries
        self.lock_timeout, self.wait, self.poll, self.name = lock_timeout, wait, poll, name
        self.stopped_by: int | None = None
        self.job_ids: list[str] = []

    def _executor(self, slots: int) -> Any:
        import submitit

        folder = self.options.folder
        if self.cluster == "slurm":
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.options.max_requeues)
            ex.update_parameters(**sbatch_parameters(self.options, slots, self.name))
            return ex
        ex = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        ex.update_parameters(timeout_min=self.options.time_min, tasks_per_node=1, nodes=1)
        return ex

    def submit(self, jobs: Sequence[B.Job]) -> list[Any]:
        """Submit ``jobs`` (grouped by GPU count into arrays); returns submitit jobs in the same order."""
        by_slots: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_slots[job.slots].append(i)
        handles: list[Any] = [None] * len(jobs)
        task = TrainTask(self.retries, self.lock_timeout)
        for slots, index in sorted(by_slots.items()):
            group = [jobs[i] for i in sorted(index, key=lambda i: -jobs[i].cost)]  # longest first
            submitted = self._executor(slots).map_array(task, group)
            for job, handle in zip(group, submitted, strict=True):
                handles[jobs.index(job)] = handle
                self.job_ids.append(str(handle.job_id))
        log.info("submitted %d runs to %s: jobs %s", len(jobs), self.cluster, ", ".join(self.job_ids))
        return handles

    def run(self, jobs: Sequence[B.Job], on_update: B.OnUpdate | None = None) -> list[B.JobResult]:
        handles = self.submit(jobs)
        results: dict[str, B.JobResult] = {}
        if not self.wait:
            return [
                B.JobResult(j.name, j.run_dir, B.JobState.PENDING, message=f"job {h.job_id}")
                for j, h in zip(jobs, handles, strict=True)
            ]
        try:
            while len(results) < len(jobs):
                for job, handle in zip(jobs, handles, strict=True):
                    if job.name not in results and handle.done():
                        results[job.name] = _result(job, handle)
                if on_update is not None:
                    on_update(self._progress(jobs, results))
                if len(results) < len(jobs):
                    time.sleep(self.poll)
        except KeyboardInterrupt:
            self.stopped_by = 2
            log.warning("stopped waiting; the SLURM jobs keep running (tlit grid status shows them)")
        return [results.get(j.name) or B.JobResult(j.name, j.run_dir, B.JobState.PENDING) for j in jobs]

    def _progress(self, jobs: Sequence[B.Job], results: dict[str, B.JobResult]) -> B.Progress:
        states, running = {}, {}
        for job in jobs:
            if job.name in results:
                states[job.name] = results[job.name].state
                continue
            holder = locks.lock_is_held(job.run_dir, self.lock_timeout)
            states[job.name] = B.JobState.RUNNING if holder else B.JobState.PENDING
            if holder:
                running[job.name] = time.time() - holder.started
        return B.Progress(states, running, 0, max(1, len(running)), 1.0, dict(results))


def _result(job: B.Job, handle: Any) -> B.JobResult:
    try:
        out = handle.result()
    except Exception as err:  # submitit re-raises the task's failure here
        message = " ".join(str(err).split())[:300]
        return B.JobResult(job.name, job.run_dir, B.JobState.FAILED, message=message)
    return B.JobResult(
        job.name, job.run_dir, B.JobState(out["state"]), out["attempts"], out["seconds"], out["message"]
    )
