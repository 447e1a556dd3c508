"""What every launcher shares: a Job (one run as an argv list), its result, its log, its cost estimate.

A job is ``python -m experiments.cli train --run-dir RUN_DIR k=v ...`` as a list of strings (user strings
never pass through a shell): the planning process has written the run's config.yaml and run.json, the child
reads them, and its ``k=v`` are the launcher's run-time overrides only (devices, threads). Its stdout and
stderr go to the run folder's log (``folder.LOG``), appended across attempts, each attempt under a header
line. A job is complete when its run folder is (``folder.classify``, with the job's config when it has
one); an exit status of 0 without a complete folder is a failure.

No torch here: planning and status import this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.launchers.calibration import Calibration
from experiments.runs import folder as RF
from transformer_lit import config as C
from transformer_lit.errors import os_error_line
from transformer_lit.params import count_parameters

log = logging.getLogger(__name__)

TAIL_LINES = 20
LOCK_HELD_ENV = "TLIT_RUN_LOCK_HELD"
"""Set in every child: its launcher holds the run's lock (so ``tlit train`` need not take it itself)."""
USER_ERROR_EXIT = 2
"""``tlit`` exits with 2 on a user error (bad config, conflicting run folder): retrying cannot help."""

# Cost model, deliberately rough: seconds ~ OVERHEAD + params x tokens x steps x SECONDS_PER_PARAM_TOKEN.
# The constant is calibrated on 2 shared CPU cores, one thread per run (tiny scale); on GPUs it is divided by
# GPU_SPEEDUP. It only orders jobs (longest first) and seeds the ETA, which then follows observed speed.
RUN_OVERHEAD_S = 8.0
"""Per run: interpreter + torch/Lightning import, tokenizer, data, final dev BLEU by beam search."""
SECONDS_PER_PARAM_TOKEN = 2.0e-10  # tiny Table 3, 2026-11-21: 1.3e-10 (d_model 128) to 3.9e-10 (h=32)
GPU_SPEEDUP = 50.0


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    """Completed by this launcher."""
    SKIPPED = "skipped"
    """Already complete before (or completed by another grid meanwhile)."""
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    """Stopped by Ctrl-C / SIGTERM; resumes from its last checkpoint next time."""

    @property
    def ok(self) -> bool:
        return self in (JobState.DONE, JobState.SKIPPED)


@dataclass
class Job:
    """One run to execute.

    Attributes:
        name: ``grid/scale/row/seedK`` (unique among the jobs of one ``run``).
        argv: The command, a list of strings; never a shell string.
        run_dir: The run folder: lock, log and summary live there.
        slots: Device slots needed (``train.devices``): k GPUs, or k CPU workers.
        cost: Estimated seconds on one slot set; orders the queue (longest first) and seeds the ETA.
        env: Extra environment variables for the process.
    """

    name: str
    argv: list[str]
    run_dir: Path
    slots: int = 1
    cost: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    expected: dict[str, Any] | None = None
    """The run's resolved config (flat); a complete folder with another config is not this job's."""
    memory: int = 0
    """Estimated GPU bytes of each of its processes (``transformer_lit.memory``; 0: unknown): the local
    launcher refuses a packing of jobs on one GPU that cannot fit it."""

    @property
    def log_path(self) -> Path:
        return self.run_dir / RF.LOG


@dataclass
class JobResult:
    name: str
    run_dir: Path
    state: JobState
    attempts: int = 0
    seconds: float = 0.0
    """Wall time of this launcher's attempts (0 for skipped jobs)."""
    message: str = ""


@dataclass
class Progress:
    """A snapshot the launcher hands to its ``on_update`` callback (the live display)."""

    states: dict[str, JobState]
    running: dict[str, float]
    """Name -> seconds since its current attempt started."""
    slots_free: int
    slots_total: int
    speed: float
    """Observed seconds per estimated second (1.0 until a job has finished here)."""
    results: dict[str, JobResult]
    seats_per_device: int = 1
    """Jobs packed onto one device (``--jobs-per-device``): a k-device job holds k whole devices, so k times
    this many seats of ``slots_total``."""

    def seats(self, job: Job) -> int:
        """Seats ``job`` holds while it runs: one for a one-device job, all seats of its devices otherwise."""
        return 1 if job.slots == 1 else job.slots * self.seats_per_device


OnUpdate = Callable[[Progress], None]


class Launcher:
    """Runs jobs and returns one result per job, in the jobs' order."""

    kind: str = "cpu"
    """Where jobs run: ``cpu``, ``cuda`` or ``slurm``; decides the device overrides of train jobs."""

    def device_overrides(self) -> list[str]:
        """Overrides appended to every train job (after the user's): the launcher decides devices."""
        return ["train.progress_bar=false"]

    def run(self, jobs: Sequence[Job], on_update: OnUpdate | None = None) -> list[JobResult]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Jobs and their cost


def estimate_seconds(
    cfg: C.RunConfig, kind: str = "cpu", *, calibration: Calibration | None = None, per_device: int = 1
) -> float:
    """Rough wall seconds of a run on its devices (see the constants above); no torch.

    ``calibration`` (a GPU's measured speed, ``experiments.launchers.calibration``) replaces the fixed
    factors on GPUs; ``per_device`` one-GPU jobs sharing a GPU slow each other by its measured packing
    (without a calibration, not at all: unknown)."""
    params = count_parameters(cfg.model, cfg.data.vocab_size)
    tokens_per_step = cfg.data.max_tokens * cfg.train.devices * C.accumulation(cfg, cfg.train.devices)
    work = params * tokens_per_step * cfg.train.max_steps / cfg.train.devices
    if kind != "cpu" and calibration is not None:
        seconds = work * calibration.seconds_per_param_token(params)
        if cfg.train.devices == 1:
            seconds *= calibration.packed_slowdown(per_device)
    else:
        seconds = work * SECONDS_PER_PARAM_TOKEN / (1.0 if kind == "cpu" else GPU_SPEEDUP)
    return RUN_OVERHEAD_S + seconds


def train_argv(run_dir: Path, runtime: Sequence[str] = ()) -> list[str]:
    """The command that trains the run planned in ``run_dir`` (``experiments.runs.run.plan``), with run-time
    overrides only: the child reads the config, it does not resolve it again."""
    return [sys.executable, "-m", "experiments.cli", "train", "--run-dir", str(run_dir), *runtime]


def is_complete(job: Job) -> bool:
    """The job's run folder is complete, with the job's config (``folder.classify``)."""
    return RF.classify(job.run_dir, expected=job.expected, check_lock=False).state is RF.RunState.COMPLETE


# ----------------------------------------------------------------------------------------------------------
# Processes and logs


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (reads only its end)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


ATTEMPT_HEADER = "=== tlit grid: "
"""How each attempt's part of ``train.log`` begins."""


def open_log(job: Job, attempt: int, attempts: int, where: str) -> int:
    """Open ``train.log`` for appending and write the attempt's header; returns a file descriptor. On a full
    disk the OSError propagates and nothing stays open."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(job.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    header = f"\n{ATTEMPT_HEADER}{job.name} attempt {attempt}/{attempts} at {stamp} on {where} ===\n"
    try:
        os.write(fd, header.encode())
    except OSError as err:  # os.write names no file: name the log
        os.close(fd)
        raise OSError(err.errno, err.strerror, str(job.log_path)) from None
    return fd


_ERROR_LINE = re.compile(
    r"^(tlit \w+: error: .*"  # a user error, as the CLI prints it
    r"|stalled: .*"  # the stall watchdog (experiments.runs.watchdog)
    r"|(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b(?::.*)?)$"  # exception line
)


def error_line(path: Path) -> str:
    """The first line of the last attempt's log that says what went wrong (``tlit train: error: ...``, the
    watchdog's ``stalled: ...``, or the exception line of a traceback); "" when none does. The grid's result
    line and ``failed.json`` show it beside the exit status."""
    text = log_tail(path, lines=400)
    text = text.rsplit(ATTEMPT_HEADER, 1)[-1]
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[rank"):  # Lightning's DDP children prefix their lines: [rank1]: ...
            line = line.split("]:", 1)[-1].strip()
        if _ERROR_LINE.match(line):
            return " ".join(line.split())[:200]
    return ""


def start_failure(job: Job, err: OSError) -> str:
    """Record a job that could not even start (a full disk, an unwritable folder) and return its one line:
    the path and why, then what the earlier attempt's log said. ``failed.json`` keeps that attempt's log
    tail; when the disk is too full even for that, a warning says so and the log itself is untouched."""
    message = f"could not start: {os_error_line(err)}"
    if earlier := error_line(job.log_path):
        message += f"; the attempt before: {earlier}"
    try:
        RF.mark_failed(job.run_dir, message, log_tail(job.log_path))
    except OSError as again:
        log.warning("%s: %s (%s not written: %s)", job.name, message, RF.FAILED, again.strerror)
    return message


def append_log(job: Job, text: str) -> None:
    with contextlib.suppress(OSError), job.log_path.open("a") as f:
        f.write(f"=== {text} ===\n")


def _die_with_parent(parent: int, ignore: Sequence[int] = ()) -> Callable[[], None]:
    """preexec_fn: on Linux, the child gets SIGKILL when the grid process dies (even by SIGKILL), so a
    killed grid leaves no orphan training its runs behind a lock that is now stale. The signals in
    ``ignore`` are ignored by the child (an ignored signal stays ignored across exec)."""

    def preexec() -> None:
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return preexec


def spawn(
    job: Job, env: dict[str, str], log_fd: int, *, drop: Sequence[str] = (), ignore: Sequence[int] = ()
) -> subprocess.Popen:
    """Start ``job`` as its own process group (so it can be killed with its DDP children), with this
    process's environment plus ``job.env`` and ``env``, minus the variables named in ``drop``, ignoring
    the signals in ``ignore`` (a SLURM task's USR2, which its launcher handles)."""
    full_env = {k: v for k, v in {**os.environ, **job.env, **env}.items() if k not in drop}
    return subprocess.Popen(
        job.argv,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid(), ignore) if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )


def terminate(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def failure_message(returncode: int | None, run_dir: Path) -> str:
    """``exited with status 1: ValueError: ...``: the exit, then the log's first error line."""
    if returncode == 0:
        return f"exited 0 but {run_dir / RF.SUMMARY} is missing or not complete"
    if returncode is not None and returncode < 0:
        how = f"killed by signal {signal.Signals(-returncode).name}"
    else:
        how = f"exited with status {returncode}"
    why = error_line(Path(run_dir) / RF.LOG)
    return f"{how}: {why}" if why else how


# ----------------------------------------------------------------------------------------------------------
# Fake jobs (benchmarks and tests of the scheduling, without training)

_FAKE_JOB = """
import json, os, sys, time
from transformer_lit.atomic import write_atomic
run_dir, seconds, fail_times, ledger, summary = sys.argv[1:]
seconds, fail_times = float(seconds), int(fail_times)
os.makedirs(run_dir, exist_ok=True)
def note(what):
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{what} {run_dir} {os.getpid()} {time.time():.3f}\\n")
counter = os.path.join(run_dir, "attempts.txt")
n = int(open(counter).read()) if os.path.exists(counter) else 0
write_atomic(counter, str(n + 1))
note("start")
print(f"fake job {run_dir}: attempt {n + 1}, {seconds}s", flush=True)
if n < fail_times:
    print("fake failure", flush=True)
    sys.exit(3)
def started_ago():  # the interpreter's own start-up counts as part of the job, as it does for a real run
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return max(0.0, float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
progress = os.path.join(run_dir, "progress.txt")  # a "checkpoint": a killed job resumes where it was
done = float(open(progress).read()) if os.path.exists(progress) else 0.0
start = time.monotonic() - done - started_ago()
done = time.monotonic() - start
while done < seconds:
    time.sleep(min(0.1, seconds - done))
    done = time.monotonic() - start
    write_atomic(progress, str(done))
result = {"status": "complete", "ppl_dev": 1.0 + seconds, "bleu_dev": 10.0, "wall_seconds": seconds}
write_atomic(os.path.join(run_dir, summary), json.dumps(result))
note("done")
"""


def fake_job(
    name: str,
    run_dir: str | Path,
    seconds: float,
    *,
    fail_times: int = 0,
    ledger: str | Path | None = None,
    slots: int = 1,
    cost: float | None = None,
) -> Job:
    """A job that lasts ``seconds`` from its process start (interpreter start-up included, as in a real
    run's cost) and then writes a complete summary; its first ``fail_times`` attempts exit 3
    instead. Each start and finish is appended to ``ledger`` as ``start|done RUN_DIR PID TIME``. Killed and
    restarted, it resumes from the time it had already run (like a checkpointed run)."""
    argv = [sys.executable, "-c", _FAKE_JOB, str(run_dir), str(seconds), str(fail_times), str(ledger or "")]
    argv.append(RF.SUMMARY)
    return Job(name, argv, Path(run_dir), slots=slots, cost=seconds if cost is None else cost)
