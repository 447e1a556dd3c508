"""One exclusive lock per run folder, so that two ``tlit grid run`` never run the same run twice.

The lock is the file ``RUN_DIR/run.lock``, created atomically (``O_CREAT | O_EXCL``, which also holds on
NFSv3+) and holding ``{"pid", "hostname", "started", "proc_start"}`` of the process that took it: the grid
process on one node, the SLURM task on a cluster. The holder touches the file now and then (a heartbeat).

A lock is *stale*, and is broken by the next process that wants it, when
- its holder ran on this host and is gone (the pid is dead, a zombie, or now belongs to a process started
  at another time): a SIGKILLed grid does not hold its runs forever;
- its holder ran on another host and the file has not been touched for ``stale_after`` seconds (we cannot
  see that host's processes, so we trust it until its heartbeat stops);
- the file is unreadable and older than a few seconds (a holder that died between create and write).

Breaking is itself serialised by a short-lived ``run.lock.break`` file, so that two processes that both
find the same stale lock do not both take it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
DEFAULT_STALE_AFTER = 900.0
"""Seconds without a heartbeat after which a lock held on another host is considered abandoned."""
HEARTBEAT_EVERY = 60.0
"""Seconds between two touches of a held lock (well under DEFAULT_STALE_AFTER)."""
_UNREADABLE_GRACE = 5.0
"""An empty or half-written lock file younger than this is a holder that is still writing it."""


def hostname() -> str:
    return socket.gethostname()


def proc_start_time(pid: int) -> int | None:
    """Start of ``pid`` in clock ticks since boot (Linux ``/proc``), to detect pid reuse; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19])  # field 22 of stat(5), 20th after the name


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """True if ``pid`` is a live (not zombie) process and, when known, the one started at ``proc_start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    state = stat[stat.rfind(")") + 2 :].split()[0]
    if state in ("Z", "X"):
        return False
    return proc_start is None or proc_start_time(pid) == proc_start


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder, and how old the file is."""

    pid: int
    hostname: str
    started: float
    proc_start: int | None
    age: float
    """Seconds since the holder last touched the file."""
    extra: dict[str, Any]

    def is_stale(self, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
        if self.hostname == hostname():
            return not pid_alive(self.pid, self.proc_start)
        return self.age > stale_after

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.hostname} since {since}"


def read_lock(run_dir: str | Path) -> LockInfo | None:
    """The lock of ``run_dir``; None if there is none. A file that cannot be parsed reads as pid -1."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    try:
        data = json.loads(text)
        return LockInfo(
            pid=int(data["pid"]),
            hostname=str(data["hostname"]),
            started=float(data["started"]),
            proc_start=data.get("proc_start"),
            age=age,
            extra={k: v for k, v in data.items() if k not in ("pid", "hostname", "started", "proc_start")},
        )
    except (ValueError, KeyError, TypeError):
        return LockInfo(pid=-1, hostname="?", started=0.0, proc_start=None, age=age, extra={})


def lock_is_held(run_dir: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> LockInfo | None:
    """The live holder of ``run_dir``'s lock, or None when it is free or stale (status display)."""
    info = read_lock(run_dir)
    if info is None:
        return None
    if info.pid == -1:
        return None if info.age > _UNREADABLE_GRACE else info
    return None if info.is_stale(stale_after) else info


def clear_stale(run_dir: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> None:
    """Remove ``run_dir``'s lock if it is stale (a run that completed just before its grid was killed)."""
    if (Path(run_dir) / LOCK_NAME).exists():
        lock = RunLock(run_dir, stale_after=stale_after)
        if lock.acquire():
            lock.release()


class RunLock:
    """The exclusive lock of one run folder.

    Use ``acquire()`` (non-blocking, True when taken) and ``release()``, or ``with RunLock(d) as lock:`` which
    raises ``LockBusy`` when another live process holds it.

    Args:
        run_dir: The run folder (created if missing).
        stale_after: Seconds without heartbeat after which a lock held on another host is broken.
        note: Extra JSON fields written into the lock (e.g. the run's name), shown by ``tlit grid status``.
    """

    def __init__(
        self, run_dir: str | Path, *, stale_after: float = DEFAULT_STALE_AFTER, note: dict | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_after = stale_after
        self.note = dict(note or {})
        self.held = False
        self._last_beat = 0.0

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; False if a live process holds it."""
        if self.held:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # create; on conflict break a stale lock and try again
            if self._try_create():
                self.held = True
                self._last_beat = time.monotonic()
                return True
            info = read_lock(self.run_dir)
            if info is None:
                continue  # released in between
            if info.pid == -1 and info.age <= _UNREADABLE_GRACE:
                return False  # its holder is writing it right now
            if info.pid != -1 and not info.is_stale(self.stale_after):
                return False
            if not self._break(info):
                return False
        return False

    def _payload(self) -> bytes:
        data = {
            "pid": os.getpid(),
            "hostname": hostname(),
            "started": time.time(),
            "proc_start": proc_start_time(os.getpid()),
            **self.note,
        }
        return (json.dumps(data) + "\n").encode()

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._payload())
        finally:
            os.close(fd)
        return True

    def _break(self, seen: LockInfo) -> bool:
        """Remove the stale lock ``seen``, unless someone else broke or replaced it meanwhile."""
        breaker = self.path.with_name(LOCK_NAME + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # a breaker that died mid-break
                if time.time() - breaker.stat().st_mtime > 30:
                    breaker.unlink()
            return False
        os.close(fd)
        try:
            now = read_lock(self.run_dir)
            same = now is not None and (now.pid, now.hostname, now.started) == (
                seen.pid,
                seen.hostname,
                seen.started,
            )
            if same:
                log.warning("%s: breaking the stale lock of %s", self.run_dir, seen.describe())
                self.path.unlink(missing_ok=True)
            return True
        finally:
            breaker.unlink(missing_ok=True)

    def heartbeat(self, force: bool = False) -> None:
        """Touch the lock file (at most every HEARTBEAT_EVERY seconds) so other hosts see the holder alive."""
        if not self.held or (not force and time.monotonic() - self._last_beat < HEARTBEAT_EVERY):
            return
        self._last_beat = time.monotonic()
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if this process still holds it (never someone else's)."""
        if not self.held:
            return
        self.held = False
        info = read_lock(self.run_dir)
        if info is not None and info.pid == os.getpid() and info.hostname == hostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        if not self.acquire():
            info = read_lock(self.run_dir)
            raise LockBusy(f"{self.run_dir} is being run by {info.describe() if info else 'another process'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockBusy(RuntimeError):
    """Another live process holds the run's lock."""
