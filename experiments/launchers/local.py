"""The local launcher: this node's devices as slots, one process per job, longest jobs first.

Slots are GPU ids (``--devices cuda:0,1,2,3`` or ``all``) or CPU workers (``cpu:2``; ``all`` without a GPU
means one per core). A job that needs k slots (``train.devices = k``) gets k GPU ids in its
``CUDA_VISIBLE_DEVICES`` and runs Lightning DDP. ``--jobs-per-device n`` packs n one-GPU jobs on each GPU
(seats): a small run uses a sliver of an H200, so n of them share it; a k-GPU job still takes k whole GPUs
(every seat of each), and the node's CPU threads are split between the seats. A packing whose n largest
one-GPU jobs would not fit the card together (``transformer_lit.memory``) is refused in one line before
anything runs. On CPU every job runs one thread per slot
(``OMP_NUM_THREADS=1``, ``train.num_threads=1``): on 2 cores, two 1-thread jobs give ~1.6x the throughput of
one 2-thread job, and two 2-thread jobs run ~90x slower (docs/DESIGN.md field notes), so slots never
oversubscribe cores.

Scheduling is list scheduling in longest-processing-time-first order (estimated cost, ``base.Job.cost``),
with EASY backfilling: when the longest waiting job needs more slots than are free, it reserves the time at
which enough running jobs should have finished, and a shorter job may jump ahead only if it should finish
before then; so a 2-slot job waits for 2 free slots without being starved by 1-slot jobs.

Each job takes its run folder's lock (``experiments.runs.locks``) before it starts and releases it after; a
job locked by another live grid is waited for, not run twice. A failed job is retried ``retries`` times, then
marked failed with the tail of its log, while the rest of the grid goes on. SIGINT/SIGTERM of the grid kill
every child's process group and return; the interrupted runs resume from their checkpoints next time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from experiments.launchers import base as B
from experiments.runs import folder as RF
from experiments.runs import locks
from transformer_lit.errors import no_gpu_message
from transformer_lit.memory import fmt_bytes

log = logging.getLogger(__name__)

DEVICES_HELP = "all, cpu:N, cpu:all, cuda:all or cuda:ID[,ID...] (e.g. cuda:0,1)"
JOBS_PER_DEVICE_HELP = "one-GPU jobs sharing each GPU (default 1); k-GPU jobs still take whole GPUs"
LOCK_RECHECK_S = 2.0
"""How often a job held by another grid is looked at again."""


@dataclass(frozen=True)
class Slots:
    """The device slots this node lends to the grid: GPU ids (as the children's CUDA_VISIBLE_DEVICES sees
    them) or CPU worker names."""

    kind: Literal["cpu", "cuda"]
    ids: tuple[str, ...]
    per_device: int = 1
    """Seats per GPU: one-GPU jobs that share it (``--jobs-per-device``); always 1 on CPU."""
    memory: int | None = None
    """Bytes of the smallest of these GPUs (nvidia-smi), for refusing a packing that cannot fit."""

    def __len__(self) -> int:
        """Seats: how many one-device jobs run at once."""
        return len(self.ids) * self.per_device

    def __str__(self) -> str:
        if self.kind == "cpu":
            return f"cpu:{len(self.ids)}"
        packed = f" x{self.per_device} jobs each" if self.per_device > 1 else ""
        return f"{self.kind}:{','.join(self.ids)}{packed}"

    def seat_ids(self) -> list[str]:
        """The device of each seat, spread over the devices first (``cuda:0,1`` x2 -> 0, 1, 0, 1)."""
        return [self.ids[i % len(self.ids)] for i in range(len(self))]

    def threads(self, devices: int) -> int:
        """CPU threads of each process of a job on ``devices`` GPUs: the node's cores split between the
        seats; a multi-GPU job holds whole GPUs, so each of its processes gets a whole GPU's share."""
        if self.kind == "cpu":
            return 1
        share = max(1, cpu_count() // len(self.ids))
        return share if devices > 1 else max(1, share // self.per_device)


def cpu_count() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """Physical GPU ids this process may use, without importing torch (CUDA_VISIBLE_DEVICES, nvidia-smi)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [] if env.strip() in ("", "-1") else [g.strip() for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_memory() -> int | None:
    """Bytes of the smallest visible GPU (nvidia-smi), None when it cannot be asked; no torch."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        mib = [int(line.strip()) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mib) * 1024**2 if mib else None


def parse_devices(spec: str, jobs_per_device: int = 1) -> Slots:
    """``all`` | ``cpu:N`` | ``cpu:all`` | ``cuda:all`` | ``cuda:0,1`` -> Slots, else a one-line ValueError.

    ``cuda:`` ids count among the visible GPUs, like torch's ``cuda:0``: with CUDA_VISIBLE_DEVICES=2,3,
    ``cuda:0`` is physical GPU 2. ``jobs_per_device`` > 1 packs that many one-GPU jobs on each GPU.
    """
    if not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise ValueError(f"--jobs-per-device must be a positive integer, got {jobs_per_device!r}")
    slots = _parse_devices(spec)
    if jobs_per_device == 1:
        return slots
    if slots.kind == "cpu":
        raise ValueError(
            f"--jobs-per-device {jobs_per_device} packs jobs on GPUs, but --devices {spec!r} gives CPU "
            "slots; on CPU use --devices cpu:N (one thread per job)"
        )
    return Slots("cuda", slots.ids, per_device=jobs_per_device, memory=gpu_memory())


def _parse_devices(spec: str) -> Slots:
    bad = ValueError(f"--devices {spec!r} is not understood; use {DEVICES_HELP}")
    text = spec.strip().lower()
    kind, _, rest = text.partition(":")
    if text == "all":
        gpus = visible_gpus()
        return (
            Slots("cuda", tuple(gpus)) if gpus else Slots("cpu", tuple(f"cpu{i}" for i in range(cpu_count())))
        )
    if kind == "cpu" and rest:
        if rest == "all":
            n = cpu_count()
        elif rest.isdigit() and int(rest) > 0:
            n = int(rest)
            _warn_oversubscribed(spec, n)
        else:
            raise bad
        return Slots("cpu", tuple(f"cpu{i}" for i in range(n)))
    if kind in ("cuda", "gpu") and rest:
        ids = [i.strip() for i in rest.split(",")]
        if rest != "all" and (not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids)):
            raise bad
        gpus = visible_gpus()
        if not gpus:  # cuda:0 as much as cuda:all: never train on CPU what was asked of a GPU
            raise ValueError(no_gpu_message(f"--devices {spec!r}", "cpu:N or cpu:all"))
        if rest == "all":
            return Slots("cuda", tuple(gpus))
        if max(int(i) for i in ids) >= len(gpus):
            where = (
                "CUDA_VISIBLE_DEVICES" if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else "nvidia-smi"
            )
            raise ValueError(f"--devices {spec!r}: only {len(gpus)} GPU(s) visible ({where})")
        return Slots("cuda", tuple(gpus[int(i)] for i in ids))
    raise bad


_warned: set[str] = set()


def _warn_oversubscribed(spec: str, workers: int) -> None:
    """Once per spec: more 1-thread workers than cores share them, and each run slows down."""
    cores = cpu_count()
    if workers > cores and spec not in _warned:
        _warned.add(spec)
        log.warning(
            "--devices %s: %d CPU workers but %d core(s) here; they will share cores and each run slower "
            "(cpu:all gives one per core)",
            spec,
            workers,
            cores,
        )


def check_accelerator(slots: Slots, accelerator: str) -> None:
    """``train.accelerator=gpu`` on CPU slots would be overridden to CPU by the launcher: refuse instead."""
    if accelerator in ("gpu", "cuda") and slots.kind == "cpu":
        what = f"train.accelerator={accelerator!r}"
        if not visible_gpus():
            raise ValueError(no_gpu_message(what, "train.accelerator=cpu or auto"))
        raise ValueError(f"{what} but --devices {slots} gives CPU slots; use --devices cuda:all or cuda:ID")


def check_packing(slots: Slots, memory: Sequence[tuple[str, int]]) -> None:
    """Refuse (one line) a packing whose ``per_device`` largest one-GPU jobs would not fit one card together
    (they may share it: longest-first puts the big ones together at the start). ``memory``: (run name,
    estimated bytes) of the one-GPU jobs. Nothing to check with one job per GPU or an unknown card size."""
    if slots.per_device == 1 or slots.memory is None or not memory:
        return
    largest = sorted(memory, key=lambda m: -m[1])[: slots.per_device]
    total = sum(m for _, m in largest)
    if total > slots.memory:
        fit = max(1, slots.memory // max(1, largest[0][1]))
        raise ValueError(
            f"--jobs-per-device {slots.per_device}: {len(largest)} runs such as {largest[0][0]} "
            f"(~{fmt_bytes(largest[0][1])} each) need ~{fmt_bytes(total)} on one GPU of "
            f"{fmt_bytes(slots.memory)}; use --jobs-per-device {fit} or fewer"
        )


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _close(r: _Running) -> None:
    os.close(r.log_fd)
    if r.pidfd is not None:
        os.close(r.pidfd)


def lpt_order(jobs: Sequence[B.Job]) -> list[B.Job]:
    """Longest (estimated) first; ties keep the grid's order."""
    return sorted(jobs, key=lambda j: -j.cost)


@dataclass
class _Waiting:
    """A job in the queue, with what it has spent so far."""

    job: B.Job
    attempts: int = 0
    seconds: float = 0.0
    not_before: float = 0.0
    """A job locked by another grid is looked at again from this time on."""
    note: str = ""


@dataclass
class _Running:
    waiting: _Waiting
    proc: subprocess.Popen
    slot_ids: tuple[str, ...]
    """The GPU ids (or CPU worker) it holds: one seat of one GPU, or every seat of k GPUs."""
    lock: locks.RunLock
    started: float
    log_fd: int
    pidfd: int | None = None
    """Readable once the process exits (Linux >= 5.3), to wake the scheduler at once."""

    @property
    def job(self) -> B.Job:
        return self.waiting.job


@dataclass
class LocalLauncher(B.Launcher):
    """Runs jobs on this node's slots.

    Args:
        slots: From ``parse_devices``.
        retries: Extra attempts of a failing job before it is marked failed.
        poll: Longest wait between two looks at the children (a child's exit wakes the scheduler at once).
        lock_timeout: Seconds without heartbeat after which another host's lock is broken.
        grace: Seconds between SIGTERM and SIGKILL when the grid is interrupted.
    """

    slots: Slots
    retries: int = 1
    poll: float = 0.5
    lock_timeout: float = locks.DEFAULT_STALE_AFTER
    grace: float = 10.0
    stopped_by: int | None = field(default=None, init=False)
    """The signal that interrupted the last ``run``, if any."""

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.slots.kind

    def device_overrides(self) -> list[str]:
        if self.slots.kind == "cpu":
            return ["train.accelerator=cpu", "train.num_threads=1", "train.progress_bar=false"]
        return ["train.progress_bar=false"]

    def env_for(self, slot_ids: Sequence[str]) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", B.LOCK_HELD_ENV: "1"}
        if self.slots.kind == "cpu":
            return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        threads = str(self.slots.threads(len(slot_ids)))
        return {
            **env,
            "CUDA_VISIBLE_DEVICES": ",".join(slot_ids),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }

    # ------------------------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[B.Job], on_update: B.OnUpdate | None = None) -> list[B.JobResult]:
        too_big = [j for j in jobs if j.slots > len(self.slots.ids)]
        if too_big:
            j = too_big[0]
            raise ValueError(
                f"{j.name} needs {j.slots} slots (train.devices) but --devices gives {len(self.slots.ids)}"
            )
        if len({j.name for j in jobs}) != len(jobs):
            raise ValueError("job names must be unique within one run of the launcher")
        check_packing(self.slots, [(j.name, j.memory) for j in jobs if j.slots == 1 and j.memory])
        self.stopped_by = None
        self._results: dict[str, B.JobResult] = {}
        self._pending = [_Waiting(j) for j in lpt_order(jobs)]
        self._running: dict[str, _Running] = {}
        self._seats = dict.fromkeys(self.slots.ids, self.slots.per_device)  # free seats per device
        self._spent = self._estimated = 0.0
        self._t0 = time.time()
        restore = self._install_signal_handlers()
        try:
            while (self._pending or self._running) and self.stopped_by is None:
                self._reap()
                self._start_what_fits()
                for r in self._running.values():
                    r.lock.heartbeat()
                if on_update is not None:
                    on_update(self._progress())
                self._wait_for_exit()
        finally:
            self._stop_all()
            restore()
            if on_update is not None:
                on_update(self._progress())
        return [self._results[j.name] for j in jobs]

    def _wait_for_exit(self) -> None:
        """Sleep until a child exits or ``poll`` seconds pass: select() on Linux pidfds makes the next job
        start the moment a slot frees (scheduler overhead ~ms), elsewhere a plain sleep."""
        if not self._running:  # only jobs held by another grid are left, or nothing at all
            if self._pending:
                time.sleep(self.poll)
            return
        fds = [r.pidfd for r in self._running.values() if r.pidfd is not None]
        if len(fds) < len(self._running):
            time.sleep(self.poll)
            return
        with contextlib.suppress(OSError, ValueError):
            select.select(fds, [], [], self.poll)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: object) -> None:
            self.stopped_by = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    @property
    def speed(self) -> float:
        """Observed seconds per estimated second over the jobs finished here."""
        return self._spent / self._estimated if self._estimated > 0 else 1.0

    def _progress(self) -> B.Progress:
        now = time.time()
        states = {w.job.name: B.JobState.PENDING for w in self._pending}
        states |= {name: B.JobState.RUNNING for name in self._running}
        states |= {name: r.state for name, r in self._results.items()}
        running = {name: now - r.started for name, r in self._running.items()}
        free = sum(self._seats.values())
        return B.Progress(
            states, running, free, len(self.slots), self.speed, dict(self._results), self.slots.per_device
        )

    def _finish(self, w: _Waiting, state: B.JobState, message: str = "") -> None:
        self._results[w.job.name] = B.JobResult(
            w.job.name, w.job.run_dir, state, w.attempts, w.seconds, message
        )
        log.debug("%s: %s%s", w.job.name, state.value, f" ({message})" if message else "")

    # ------------------------------------------------------------------------------------------------------

    def _start_what_fits(self) -> None:
        now = time.time()
        reserve_at: float | None = None  # when the longest blocked job should find its slots free
        for w in list(self._pending):
            if w.not_before > now:
                continue
            if not self._fits(w.job.slots, self._seats):
                if reserve_at is None:
                    reserve_at = self._slots_free_at(w.job.slots, now)
                continue
            if reserve_at is not None and now + w.job.cost * self.speed > reserve_at:
                continue  # would delay the reserved (longer) job
            self._try_start(w, now)

    def _fits(self, devices: int, seats: dict[str, int]) -> bool:
        """A one-device job needs a free seat; a k-device job needs k devices with every seat free."""
        if devices == 1:
            return any(seats.values())
        return sum(n == self.slots.per_device for n in seats.values()) >= devices

    def _take(self, devices: int) -> tuple[str, ...]:
        """Seats for a job that fits: a one-device job goes to the device with the most free seats (packed
        jobs spread out; ties in the slots' order); a k-device job takes k whole devices."""
        if devices == 1:
            best = max(self.slots.ids, key=lambda i: self._seats[i])
            self._seats[best] -= 1
            return (best,)
        whole = [i for i in self.slots.ids if self._seats[i] == self.slots.per_device][:devices]
        for i in whole:
            self._seats[i] = 0
        return tuple(whole)

    def _give_back(self, slot_ids: tuple[str, ...]) -> None:
        for i in slot_ids:
            self._seats[i] += 1 if len(slot_ids) == 1 else self.slots.per_device

    def _slots_free_at(self, needed: int, now: float) -> float:
        """Estimated time at which a job on ``needed`` devices fits, from the running jobs' expected ends."""
        ends = sorted(
            (max(now, r.started + r.job.cost * self.speed), r.slot_ids) for r in self._running.values()
        )
        seats = dict(self._seats)
        for end, ids in ends:
            for i in ids:
                seats[i] += 1 if len(ids) == 1 else self.slots.per_device
            if self._fits(needed, seats):
                return end
        return now

    def _try_start(self, w: _Waiting, now: float) -> None:
        job = w.job
        if B.is_complete(job):
            locks.clear_stale(job.run_dir, self.lock_timeout)
            self._pending.remove(w)
            return self._finish(w, B.JobState.SKIPPED, w.note and "completed by another grid")
        lock = locks.RunLock(job.run_dir, stale_after=self.lock_timeout, note={"run": job.name})
        if not lock.acquire():
            holder = locks.read_lock(job.run_dir)
            w.not_before, w.note = now + LOCK_RECHECK_S, f"held by {holder.describe() if holder else '?'}"
            return None
        if B.is_complete(job):  # finished between our check and our lock
            lock.release()
            self._pending.remove(w)
            return self._finish(w, B.JobState.SKIPPED, "completed by another grid")
        if w.note and self._failed_since_start(job):
            lock.release()
            self._pending.remove(w)
            return self._finish(w, B.JobState.FAILED, f"failed in another grid (see {RF.FAILED})")
        w.attempts += 1
        slot_ids = self._take(job.slots)
        attempts = self.retries + 1
        where = f"{locks.hostname()} {self.slots.kind}:{','.join(slot_ids)}"
        fd = -1
        try:
            fd = B.open_log(job, w.attempts, attempts, where)
            proc = B.spawn(job, self.env_for(slot_ids), fd)
        except OSError as err:  # a full disk, an unwritable folder: this run fails, the grid goes on
            if fd >= 0:
                os.close(fd)
            self._give_back(slot_ids)
            lock.release()
            self._pending.remove(w)
            return self._finish(w, B.JobState.FAILED, B.start_failure(job, err))
        self._pending.remove(w)
        self._running[job.name] = _Running(w, proc, slot_ids, lock, time.time(), fd, _pidfd(proc.pid))
        log.debug("started %s on %s (pid %d)", job.name, where, proc.pid)
        return None

    def _failed_since_start(self, job: B.Job) -> bool:
        path = job.run_dir / RF.FAILED
        with contextlib.suppress(OSError):
            return path.stat().st_mtime >= self._t0
        return False

    def _reap(self) -> None:
        for name, r in list(self._running.items()):
            rc = r.proc.poll()
            if rc is None:
                continue
            del self._running[name]
            _close(r)
            self._give_back(r.slot_ids)
            w = r.waiting
            elapsed = time.time() - r.started
            w.seconds += elapsed
            if rc == 0 and B.is_complete(r.job):
                r.lock.release()
                self._spent += elapsed
                self._estimated += r.job.cost
                self._finish(w, B.JobState.DONE)
                continue
            message = B.failure_message(rc, r.job.run_dir)
            B.append_log(r.job, f"attempt {w.attempts} failed: {message}")
            if w.attempts <= self.retries and rc != B.USER_ERROR_EXIT:
                r.lock.release()
                w.note = ""
                self._pending.insert(self._position(w), w)
                log.warning("%s: %s; retrying (%d/%d)", name, message, w.attempts, self.retries)
                continue
            RF.mark_failed(r.job.run_dir, message, B.log_tail(r.job.log_path))
            r.lock.release()
            self._finish(w, B.JobState.FAILED, message)

    def _position(self, w: _Waiting) -> int:
        """Where a retried job goes back in the LPT-ordered queue."""
        for i, other in enumerate(self._pending):
            if other.job.cost < w.job.cost:
                return i
        return len(self._pending)

    def _stop_all(self) -> None:
        """Kill the running children (interrupt or error), release their locks, record them as interrupted."""
        if self._running:
            B.terminate([r.proc for r in self._running.values()], self.grace)
        for r in self._running.values():
            _close(r)
            B.append_log(r.job, "interrupted by the grid; resumes from its last checkpoint next time")
            r.lock.release()
            w = r.waiting
            w.seconds += time.time() - r.started
            self._finish(w, B.JobState.INTERRUPTED, "interrupted; resumes from its last checkpoint")
        self._running.clear()
        for w in self._pending:
            self._results.setdefault(w.job.name, B.JobResult(w.job.name, w.job.run_dir, B.JobState.PENDING))
        self._pending.clear()
