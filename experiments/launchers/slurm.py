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

``jobs_per_device`` n > 1 (``--jobs-per-device``): the one-GPU runs go n to an array task, which holds one
GPU and trains its runs at once (``PackedTask``: one ``TrainTask`` per run, in threads, the task's CPUs split
between them); longest runs are bundled together, so a bundle's runs end at about the same time.

Inside a task, Lightning must not treat the single SLURM task as its DDP world (it would wait for k srun
tasks): the training process gets the environment without ``SLURM_NTASKS``, so Lightning's own launcher
starts the k ranks on the node's k GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.launchers import base as B
from experiments.launchers import slurm_jobs
from experiments.runs import folder as RF
from experiments.runs import locks

log = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local", "debug")
DEFAULT_SIGNAL_DELAY_S = 120
"""SLURM sends USR2 this long before a task's time limit (``--signal``): time to stop and requeue."""


def _skipped(message: str) -> dict[str, Any]:
    """The result of a task that had nothing to train."""
    return {"state": B.JobState.SKIPPED.value, "attempts": 0, "seconds": 0.0, "message": message}


@dataclass
class SlurmOptions:
    """Resources of one array task (one run); the GPU count comes from the run's ``train.devices``.

    Attributes:
        folder: Where submitit keeps its pickles and logs (must be on a shared filesystem).
        partition: SLURM partition (None: the cluster's default).
        time_min: Wall time limit per task, in minutes (at least 1: SLURM reads 0 as no limit); a run that
            needs longer is checkpointed ``signal_delay_s`` before the limit, requeued and resumed.
        mem_gb: Memory per task in GB (None: the partition's default); sbatch gets ``2G`` or ``1536M``.
        cpus_per_gpu: CPU cores per GPU (data loading, tokenisation).
        gpus: Ask for ``train.devices`` GPUs per task (False: CPU-only tasks of ``train.devices`` cores).
        array_parallelism: Array tasks running at once.
        max_requeues: Time limits after which a run is not requeued any more but marked failed (submitit's
            ``max_num_timeout``; preemptions do not count).
        signal_delay_s: Seconds before the time limit at which SLURM sends USR2 (the checkpoint signal).
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
    signal_delay_s: int | None = None
    """None: 120 s, or half the time limit when that is shorter."""
    extra: dict[str, Any] = field(default_factory=dict)
    jobs_per_device: int = 1
    """One-GPU runs sharing each array task's GPU (``PackedTask``)."""

    @property
    def signal_delay(self) -> int:
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        return min(DEFAULT_SIGNAL_DELAY_S, 30 * self.time_min)

    def check(self) -> None:
        """One line per bad value (a ValueError naming the flag), before anything is submitted."""
        if self.time_min < 1:
            raise ValueError(
                f"--time must be at least 1 (minutes; SLURM reads 0 as no limit), got {self.time_min}"
            )
        if self.signal_delay_s is not None and not 1 <= self.signal_delay_s < 60 * self.time_min:
            raise ValueError(
                f"--signal-delay must be between 1 and --time ({60 * self.time_min} s) - 1 seconds, "
                f"got {self.signal_delay_s}"
            )
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"--mem must be a positive number of GB, got {self.mem_gb:g}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues must be 0 or more, got {self.max_requeues}")
        if self.cpus_per_gpu < 1:
            raise ValueError(f"--cpus-per-gpu must be at least 1, got {self.cpus_per_gpu}")
        if not isinstance(self.jobs_per_device, int) or self.jobs_per_device < 1:
            raise ValueError(f"--jobs-per-device must be a positive integer, got {self.jobs_per_device!r}")


def mem_text(mem_gb: float) -> str:
    """Memory as sbatch reads it: whole GB as ``2G``, anything else as whole MB (``1.5`` -> ``1536M``)."""
    if mem_gb == int(mem_gb):
        return f"{int(mem_gb)}G"
    return f"{max(1, round(mem_gb * 1024))}M"


def sbatch_parameters(opts: SlurmOptions, slots: int, name: str) -> dict[str, Any]:
    """Parameters of ``submitit.SlurmExecutor.update_parameters`` for tasks of ``slots`` devices."""
    params: dict[str, Any] = {
        "job_name": name,
        "time": opts.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": opts.cpus_per_gpu * slots if opts.gpus else slots,
        "signal_delay_s": opts.signal_delay,
        "array_parallelism": opts.array_parallelism,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **opts.extra},
    }
    if opts.gpus:
        params["gpus_per_node"] = slots
    if opts.partition:
        params["partition"] = opts.partition
    if opts.mem_gb is not None:
        params["mem"] = mem_text(opts.mem_gb)  # submitit's SlurmExecutor passes it as it is
    return params


def sbatch_script(opts: SlurmOptions, slots: int, name: str, tasks: int, python: str | None = None) -> str:
    """The sbatch file submitit writes for an array of ``tasks`` runs (no cluster needed)."""
    from submitit.slurm import slurm as S

    params = sbatch_parameters(opts, slots, name)
    python = python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(opts.folder))])
    return S._make_sbatch_string(command=command, folder=opts.folder, map_count=tasks, **params)


GPU_ACCELERATORS = ("gpu", "cuda")


def wants_gpus(devices: str, partition: str | None, accelerators: set[str] = frozenset()) -> bool:
    """Whether tasks ask for GPUs: ``--devices all`` when the partition has GPUs, ``cuda`` always, ``cpu``
    never (CPU-only tasks). A run that insists on a GPU (``train.accelerator=cuda``) on CPU-only tasks is
    refused in one line (it would silently train on CPU)."""
    text = devices.strip().lower()
    kind = text.partition(":")[0]
    if text == "all":
        gpus = slurm_jobs.partition_has_gpus(partition)
    elif kind == "cpu":
        gpus = False
    elif text in ("cuda", "gpu", "cuda:all", "gpu:all"):
        gpus = True
    else:
        raise ValueError(
            f"--devices {devices!r} with --launcher slurm: use all (GPUs if the partition has them), cpu "
            "(CPU-only tasks) or cuda (GPUs); each task gets train.devices of them"
        )
    insisting = sorted(a for a in accelerators if a in GPU_ACCELERATORS)
    if insisting and not gpus:
        where = f"partition {partition}" if partition else "the default partition"
        why = "--devices cpu asks for CPU-only tasks" if kind == "cpu" else f"{where} has no GPUs"
        raise ValueError(
            f"train.accelerator={insisting[0]} asks for GPUs but {why}; use train.accelerator=auto"
        )
    return gpus


def check_submission(opts: SlurmOptions, slot_counts: Sequence[int], name: str) -> None:
    """Everything sbatch would refuse, refused here in one line before any array is submitted: no SLURM
    client, a bad option, GPUs asked of a partition without any, and whatever ``sbatch --test-only`` says
    of each array's script (an unknown partition, account or constraint: SLURM's own words)."""
    opts.check()
    missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--launcher slurm: {missing[0]} is not on PATH (no SLURM client here); "
            "submit from a login node, or use --launcher local"
        )
    if opts.gpus and not slurm_jobs.partition_has_gpus(opts.partition):
        where = f"partition {opts.partition}" if opts.partition else "the default partition"
        raise ValueError(
            f"the runs ask for GPUs (train.devices per task) but {where} has none (sinfo lists no gpu "
            "gres); use --devices cpu for CPU-only tasks, or --partition with GPUs"
        )
    folder = Path(opts.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for slots in sorted(set(slot_counts)):
        script = folder / f".test-only-{os.getpid()}-{slots}.sh"
        script.write_text(sbatch_script(opts, slots, name, 1))
        try:
            out = subprocess.run(
                ["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60
            )
        finally:
            script.unlink(missing_ok=True)
        if out.returncode != 0:
            raise ValueError(f"sbatch refuses the job array: {slurm_jobs.one_line(out.stderr or out.stdout)}")


HIDDEN_FROM_LIGHTNING = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")
"""Without these, Lightning does not take the one SLURM task for its DDP world and spawns its own ranks."""


STOPPED_LINE = "stopped by {signal} ({why}); resumes from its last checkpoint when SLURM starts it again"
"""The log line of the task's checkpoint handler (tests look for it)."""


class _SlurmTask:
    """What both task kinds share: the running child process, and SIGTERM (``scontrol requeue``, ``scancel``,
    preemption), which SLURM sends to every process of the job step (the child included) and follows with
    SIGKILL after KillWait: the task waits for its child to stop and ends, writing no result (a requeued task
    comes back under the same id; a cancelled one is read from squeue)."""

    TRANSIENT = ("_proc", "_lock", "_stopped_by")

    _proc: Any = None
    _stopped_by: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, **dict.fromkeys(self.TRANSIENT))

    @contextlib.contextmanager
    def _sigterm_stops(self):
        """SIGTERM: remember it (submitit's own handler only logs it). The child got it from SLURM too, which
        signals every process of the job step; a second one from us would interrupt its clean stop."""

        def handler(signum: int, _frame: object) -> None:
            self._stopped_by = signal.Signals(signum).name

        try:
            old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (a test calling the task directly)
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)

    def _leave_without_result(self) -> None:
        """End the task process now, with no result: submitit writes one only for a return or an Exception,
        and SLURM requeues the task sooner once its processes are gone (rather than after KillWait)."""
        raise SystemExit(f"stopped by {self._stopped_by}; SLURM requeues or has cancelled this task")


class TrainTask(_SlurmTask):
    """The callable submitit runs for each array task: one run, with lock, retries and requeue.

    Checkpointable the submitit way (a ``__call__`` and a ``checkpoint`` that resubmits itself); the
    model state lives in the run folder's checkpoints, not in this object. Signals:

    - USR2 (``--signal``, before the time limit, or ``scancel --signal=USR2``): submitit calls
      ``checkpoint``, which stops the training process and requeues the task (up to ``max_requeues``
      time limits; past them the run is marked failed with that reason). The training process ignores USR2
      (SLURM signals every process of the step), so it is stopped only by us, between two steps.
    - SIGTERM (``scontrol requeue``, ``scancel``, preemption): SLURM stops the whole job and decides whether
      it comes back; the training process stops between two steps, the task frees the run and writes no
      result, so that a requeued task is still followed and a cancelled one reads as interrupted.
    """

    def __init__(
        self,
        retries: int = 1,
        lock_timeout: float = locks.DEFAULT_STALE_AFTER,
        poll: float = 1.0,
        max_requeues: int = 3,
    ):
        self.retries = retries
        self.lock_timeout = lock_timeout
        self.poll = poll
        self.max_requeues = max_requeues
        self.attempts = 0
        self.env: dict[str, str] = {}
        """Extra environment of the training process (a packed run's thread count)."""
        self._proc: Any = None
        self._lock: locks.RunLock | None = None
        self._stopped_by: str | None = None
        self._start = 0.0
        self._before = 0.0

    def __call__(self, job: B.Job) -> dict[str, Any]:
        from submitit.core.utils import UncompletedJobError

        self._start = time.time()
        self._before = RF.slurm_seconds(job.run_dir)  # earlier segments of this submission
        if B.is_complete(job):
            return _skipped("already complete")
        lock = locks.RunLock(job.run_dir, stale_after=self.lock_timeout, note={"run": job.name})
        while not lock.acquire():  # another grid runs it: wait for it (within this task's time)
            if B.is_complete(job):
                return _skipped("completed by another grid")
            time.sleep(max(self.poll, 5.0))
        self._lock = lock
        try:
            with self._sigterm_stops():
                return self._attempts(job)
        except UncompletedJobError as err:  # submitit's USR2 handler, past --max-requeues time limits
            return self.timed_out(job, err)
        finally:
            lock.release()
            self._lock = None

    def timed_out(self, job: B.Job, err: Exception) -> dict[str, Any]:
        """Past ``--max-requeues`` time limits (submitit refused to requeue): the run is marked failed."""
        message = f"timed out more than --max-requeues {self.max_requeues} times ({err})"
        B.append_log(job, f"not requeued: {message}")
        RF.mark_failed(job.run_dir, message, B.log_tail(job.log_path))
        return self._result(B.JobState.FAILED, message)

    def _result(self, state: B.JobState, message: str = "") -> dict[str, Any]:
        seconds = self._before + time.time() - self._start
        return {"state": state.value, "attempts": self.attempts, "seconds": seconds, "message": message}

    def _attempts(self, job: B.Job) -> dict[str, Any]:
        if B.is_complete(job):
            return _skipped("completed by another grid")
        message = ""
        while self.attempts <= self.retries:
            if self._stopped_by is not None:
                self._stop_for_slurm(job)
            self.attempts += 1
            where = f"{locks.hostname()} slurm job {_task_id()}"
            fd = B.open_log(job, self.attempts, self.retries + 1, where)
            try:
                self._proc = B.spawn(
                    job,
                    {"PYTHONUNBUFFERED": "1", B.LOCK_HELD_ENV: "1", **self.env},
                    fd,
                    drop=HIDDEN_FROM_LIGHTNING,
                    ignore=(signal.SIGUSR2,),
                )
                while self._proc.poll() is None:
                    assert self._lock is not None
                    self._lock.heartbeat()
                    time.sleep(self.poll)
                rc = self._proc.returncode
            finally:
                os.close(fd)
                self._proc = None
            if self._stopped_by is not None:
                self._stop_for_slurm(job)
            if rc == 0 and B.is_complete(job):
                return self._result(B.JobState.DONE)
            message = B.failure_message(rc, job.run_dir)
            B.append_log(job, f"attempt {self.attempts} failed: {message}")
            if rc == B.USER_ERROR_EXIT:
                break
        RF.mark_failed(job.run_dir, message, B.log_tail(job.log_path))
        return self._result(B.JobState.FAILED, message)

    def _stop_for_slurm(self, job: B.Job) -> None:
        """After SIGTERM: free the run and end the task with no result (a requeued task comes back under the
        same id; a cancelled one is read as interrupted)."""
        B.append_log(job, STOPPED_LINE.format(signal=self._stopped_by, why="scancel, requeue or preemption"))
        RF.add_slurm_seconds(job.run_dir, time.time() - self._start)
        if self._lock is not None:
            self._lock.release()
        self._leave_without_result()

    def checkpoint(self, job: B.Job) -> Any:
        """USR2 (time limit or preemption): stop training (it resumes from its checkpoint), free the run, and
        hand submitit the task to requeue (submitit refuses past ``max_requeues`` time limits)."""
        from submitit.helpers import DelayedSubmission

        self.stop_for_requeue(job)
        return DelayedSubmission(self, job)

    def stop_for_requeue(self, job: B.Job) -> None:
        if self._proc is not None:
            B.terminate([self._proc], grace=60.0)
            self.attempts = max(0, self.attempts - 1)  # a preemption is not a failed attempt
        if self._lock is not None:
            self._lock.release()
        RF.add_slurm_seconds(job.run_dir, time.time() - self._start)
        B.append_log(job, STOPPED_LINE.format(signal="SIGUSR2", why="time limit or preemption"))


class PackedTask:
    """The callable of an array task that holds one GPU and trains several runs on it at once
    (``--jobs-per-device``): one ``TrainTask`` per run, each in a thread, with ``cpus // len(jobs)``
    threads each. Returns ``{run name: result}``. USR2 stops and requeues them all; SIGTERM is passed on
    to every training process."""

    def __init__(self, task: TrainTask, cpus: int) -> None:
        self.template, self.cpus = task, cpus
        self.tasks: dict[str, TrainTask] = {}
        """One per run, kept across requeues (attempts, seconds so far)."""

    def __call__(self, jobs: Sequence[B.Job]) -> dict[str, dict[str, Any]]:
        import copy
        import threading

        from submitit.core.utils import UncompletedJobError

        threads = str(max(1, self.cpus // max(1, len(jobs))))
        for job in jobs:
            task = self.tasks.setdefault(job.name, copy.copy(self.template))
            task.env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        results: dict[str, dict[str, Any]] = {}

        def one(job: B.Job) -> None:
            results[job.name] = self.tasks[job.name](job)

        workers = [threading.Thread(target=one, args=(j,), name=j.name, daemon=True) for j in jobs]
        old = signal.getsignal(signal.SIGTERM)
        with contextlib.suppress(ValueError):  # SIGTERM: pass it on (the tasks' own handlers need the
            signal.signal(signal.SIGTERM, self._sigterm)  # main thread)
        try:
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                time.sleep(0.2)  # the main thread stays free for submitit's USR2 handler
        except UncompletedJobError as err:  # past --max-requeues time limits
            for job in jobs:
                if job.name not in results:
                    results[job.name] = self.tasks[job.name].timed_out(job, err)
        finally:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, old)
        return results

    def _sigterm(self, signum: int, _frame: object) -> None:
        for task in self.tasks.values():
            task._stopped_by = signal.Signals(signum).name
            if task._proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(task._proc.pid, signal.SIGTERM)

    def checkpoint(self, jobs: Sequence[B.Job]) -> Any:
        """USR2: stop every run of the task (each resumes from its checkpoint) and requeue the task."""
        from submitit.helpers import DelayedSubmission

        for job in jobs:
            if job.name in self.tasks:
                self.tasks[job.name].stop_for_requeue(job)
        return DelayedSubmission(self, jobs)


class CommandTask(_SlurmTask):
    """The callable submitit runs for a task that is one command to its end (a sweep worker): no run
    folder and no lock; the command's output is appended to ``log``. USR2 stops the command and requeues the
    task (a sweep worker's trial is queued again and the requeued worker goes on); SIGTERM reaches the
    command from SLURM itself. Returns the command's exit status."""

    def __init__(self, poll: float = 1.0) -> None:
        self.poll = poll

    def __call__(self, job: B.Job, log: str) -> int:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"\n=== {job.name} on {locks.hostname()} slurm job {_task_id()} ===\n".encode())
            env = {"PYTHONUNBUFFERED": "1"}
            with self._sigterm_stops():
                self._proc = B.spawn(job, env, fd, drop=HIDDEN_FROM_LIGHTNING, ignore=(signal.SIGUSR2,))
                while self._proc.poll() is None:
                    time.sleep(self.poll)
                if self._stopped_by is not None:
                    os.write(fd, f"=== {self._stopped_by}: stopped by SLURM ===\n".encode())
                    self._leave_without_result()
            return int(self._proc.returncode)
        finally:
            os.close(fd)
            self._proc = None

    def checkpoint(self, job: B.Job, log: str) -> Any:
        from submitit.helpers import DelayedSubmission

        if self._proc is not None:
            B.terminate([self._proc], grace=60.0)
        with contextlib.suppress(OSError), open(log, "a") as f:
            f.write(f"=== {STOPPED_LINE.format(signal='SIGUSR2', why='time limit or preemption')} ===\n")
        return DelayedSubmission(self, job, log)


def _task_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")


def _squeue_job_class() -> Any:
    """submitit's SlurmJob, followed with squeue instead of sacct (``slurm_jobs``): one class, made once."""
    global _SQUEUE_JOB
    if _SQUEUE_JOB is None:
        from submitit.slurm import slurm as S

        class SqueueWatcher(S.SlurmInfoWatcher):
            def _make_command(self) -> list[str] | None:
                return None  # ``update`` below asks squeue itself

            def update(self) -> None:
                pending = sorted(self._registered - self._finished)
                if not pending:
                    return
                self._num_calls += 1
                states = slurm_jobs.job_states(pending)
                self._info_dict.update({j: {"JobID": j, "State": s} for j, s in states.items()})
                self._last_status_check = time.time()
                for job_id in pending:
                    if self.is_done(job_id, mode="cache"):
                        self._finished.add(job_id)

        class SqueueJob(S.SlurmJob):
            watcher = SqueueWatcher(delay_s=60)

        _SQUEUE_JOB = SqueueJob
    return _SQUEUE_JOB


_SQUEUE_JOB: Any = None


class SlurmLauncher(B.Launcher):
    """Submits jobs as SLURM job arrays (one array per GPU count) and, by default, waits for them.

    Each submitted task's id is written into its run folder (``folder.SLURM_JOB``): ``tlit grid status``
    shows SLURM's state beside ours, and a rerun follows a run whose task is still queued or running instead
    of submitting it again.

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
        self._checked = False
        self.followed: dict[str, str] = {}
        """Runs already queued or running on SLURM when ``run`` was called: name -> task id."""

    def __str__(self) -> str:
        where = f"partition {self.options.partition}" if self.options.partition else "the default partition"
        tasks = "GPU" if self.options.gpus else "CPU-only"
        return f"{self.cluster} ({tasks} tasks, {where}, --time {self.options.time_min})"

    def preflight(self, slot_counts: set[int] | Sequence[int]) -> None:
        """Refuse in one line what sbatch would refuse (``check_submission``), before anything is prepared
        or submitted; done once."""
        if self.cluster == "slurm" and not self._checked:
            check_submission(self.options, sorted(set(slot_counts)), self.name)
            self._checked = True

    def device_overrides(self) -> list[str]:
        """CPU-only tasks train on one thread per device, as the local launcher's CPU slots do."""
        if not self.options.gpus:
            return ["train.accelerator=cpu", "train.num_threads=1", "train.progress_bar=false"]
        return ["train.progress_bar=false"]

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
        if not jobs:
            return []
        by_slots: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_slots[job.slots].append(i)
        self.preflight(list(by_slots))
        handles: list[Any] = [None] * len(jobs)
        task = TrainTask(self.retries, self.lock_timeout, max_requeues=self.options.max_requeues)
        n = self.options.jobs_per_device
        for slots, index in sorted(by_slots.items()):
            group = [jobs[i] for i in sorted(index, key=lambda i: -jobs[i].cost)]  # longest first
            if slots == 1 and n > 1:  # n runs per task's GPU, the longest together
                bundles = [group[i : i + n] for i in range(0, len(group), n)]
                packed = PackedTask(task, self.options.cpus_per_gpu)
                members = list(zip(bundles, self.map_array(slots, packed, bundles), strict=True))
            else:
                members = [
                    ([job], h) for job, h in zip(group, self.map_array(slots, task, group), strict=True)
                ]
            for bundle, handle in members:
                self.job_ids.append(str(handle.job_id))
                for job in bundle:
                    handles[jobs.index(job)] = handle
                    if self.cluster == "slurm":
                        RF.write_slurm_job(job.run_dir, str(handle.job_id), self.options.folder)
        log.info("submitted %d runs to %s: jobs %s", len(jobs), self.cluster, ", ".join(self.job_ids))
        return handles

    def map_array(self, slots: int, task: Any, *args: Sequence[Any]) -> list[Any]:
        """One job array of ``task(*args[i])`` tasks of ``slots`` devices each; on SLURM, handles that
        squeue follows. sbatch's refusal is one line."""
        if self.cluster != "slurm":
            return self._executor(slots).map_array(task, *args)
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        self.preflight([slots])
        try:
            submitted = self._executor(slots).map_array(task, *args)
        except (FailedJobError, FailedSubmissionError) as err:
            raise ValueError(f"sbatch failed: {slurm_jobs.one_line(str(err))[:300]}") from None
        job_class = _squeue_job_class()
        return [job_class(folder=self.options.folder, job_id=str(h.job_id)) for h in submitted]

    def in_flight(self, jobs: Sequence[B.Job]) -> dict[str, tuple[str, Path]]:
        """Jobs whose run folder names a SLURM task that is still queued or running: name -> (task id,
        submitit folder). A rerun follows those instead of submitting them again."""
        if self.cluster != "slurm":
            return {}
        recorded = {j.name: rec for j in jobs if (rec := RF.read_slurm_job(j.run_dir)) is not None}
        states = slurm_jobs.job_states(rec[0] for rec in recorded.values())
        return {n: rec for n, rec in recorded.items() if states.get(rec[0]) in slurm_jobs.ALIVE}

    def run(self, jobs: Sequence[B.Job], on_update: B.OnUpdate | None = None) -> list[B.JobResult]:
        alive = self.in_flight(jobs)
        self.followed = {n: task for n, (task, _) in alive.items()}
        if alive:
            log.info(
                "%d runs already queued or running on SLURM (%s): not submitted again",
                len(alive),
                ", ".join(sorted(self.followed.values())),
            )
        fresh = [j for j in jobs if j.name not in alive]
        new = dict(zip((j.name for j in fresh), self.submit(fresh), strict=True))
        job_class = _squeue_job_class() if alive else None
        handles = [
            new[j.name] if j.name in new else job_class(folder=alive[j.name][1], job_id=alive[j.name][0])
            for j in jobs
        ]
        results: dict[str, B.JobResult] = {}
        if not self.wait:
            return [
                B.JobResult(
                    j.name,
                    j.run_dir,
                    B.JobState.PENDING,
                    message=f"job {h.job_id}" + (" (submitted before)" if j.name in alive else ""),
                )
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
    except Exception as err:  # submitit re-raises the task's failure here, or finds no result
        if B.is_complete(job):
            return B.JobResult(job.name, job.run_dir, B.JobState.DONE)
        followed = _SQUEUE_JOB is not None and isinstance(handle, _SQUEUE_JOB)
        state = (
            "" if not followed else slurm_jobs.job_states([str(handle.job_id)]).get(str(handle.job_id), "")
        )
        if state in slurm_jobs.INTERRUPTED:
            message = f"SLURM job {handle.job_id} {state.lower()}; resumes from its last checkpoint next time"
            return B.JobResult(job.name, job.run_dir, B.JobState.INTERRUPTED, message=message)
        message = " ".join(str(err).split())[:300]
        return B.JobResult(job.name, job.run_dir, B.JobState.FAILED, message=message)
    if "state" not in out:  # a packed task's {run name: result}
        out = out.get(job.name) or {"state": "failed", "attempts": 0, "seconds": 0.0, "message": "no result"}
    return B.JobResult(
        job.name, job.run_dir, B.JobState(out["state"]), out["attempts"], out["seconds"], out["message"]
    )
