"""One exclusive lock per run folder, so that two ``tlit grid run`` never run the same run twice.

The lock is the file ``folder.LOCK`` inside the run folder, published in one step (written to a temporary
file, then hard-linked onto the name, which fails if it exists and also holds on NFSv3+), holding
``{"pid", "hostname", "started", "proc_start"}`` of the process that took it: the grid process on one
node, the SLURM task on a cluster. The holder touches the file now and then (a heartbeat).

A stale lock (its holder is gone, or silent for ``stale_after`` seconds on another host: see
``experiments.runs.lockfile``) is broken by the next process that wants it. Breaking is itself serialised
by a short-lived ``<lock>.break`` file, so that two processes that both find the same stale lock do not
both take it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from experiments.runs import folder as RF
from experiments.runs.lockfile import DEFAULT_STALE_AFTER, LockInfo, hostname, payload
from experiments.runs.lockfile import read as _read

__all__ = [
    "DEFAULT_STALE_AFTER",
    "HEARTBEAT_EVERY",
    "LockBusy",
    "LockInfo",
    "RunLock",
    "clear_stale",
    "hostname",
    "lock_is_held",
    "read_lock",
]

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 60.0
"""Seconds between two touches of a held lock (well under DEFAULT_STALE_AFTER)."""


def read_lock(run_dir: str | Path) -> LockInfo | None:
    """The lock of ``run_dir``; None if there is none. A file that cannot be parsed reads as pid -1."""
    return _read(Path(run_dir) / RF.LOCK)


def lock_is_held(run_dir: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> LockInfo | None:
    """The live holder of ``run_dir``'s lock, or None when it is free or stale (status display)."""
    return RF.live_lock(run_dir, stale_after)


def clear_stale(run_dir: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> None:
    """Remove ``run_dir``'s lock if it is stale (a run that completed just before its grid was killed)."""
    if (Path(run_dir) / RF.LOCK).exists():
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
        self.path = self.run_dir / RF.LOCK
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
            if not info.is_stale(self.stale_after):
                return False  # a live holder (or one still writing an old-style lock)
            if not self._break(info):
                return False
        return False

    def _try_create(self) -> bool:
        """Publish a complete lock file in one step; False if one exists."""
        try:
            RF.write_atomic(self.path, payload(self.note), exclusive=True)
        except FileExistsError:
            return False
        return True

    def _break(self, seen: LockInfo) -> bool:
        """Remove the stale lock ``seen``, unless someone else broke or replaced it meanwhile."""
        breaker = self.path.with_name(self.path.name + ".break")
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
