"""What a run lock file says, and whether its holder is still alive; no knowledge of where it lives.

A lock file holds ``{"pid", "hostname", "started", "proc_start"}`` of the process that took it (plus notes
such as the run's name), and its modification time is the holder's last heartbeat. ``experiments.runs.locks``
takes and breaks locks; ``experiments.runs.folder`` reads them to tell a running run from an interrupted one.
Both give this module the lock's path (``folder.LOCK`` inside the run folder).

A lock is *stale* when
- its holder ran on this host and is gone (the pid is dead, a zombie, or now belongs to a process started
  at another time): a SIGKILLed grid does not hold its runs forever;
- its holder ran on another host and the file has not been touched for ``stale_after`` seconds (we cannot
  see that host's processes, so we trust it until its heartbeat stops);
- the file is unreadable and older than a few seconds (written by an older version that created the file
  before writing it, and died in between).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STALE_AFTER = 900.0
"""Seconds without a heartbeat after which a lock held on another host is considered abandoned."""
UNREADABLE_GRACE = 5.0
"""An unreadable lock file younger than this may be one whose holder is still writing it."""


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
        if self.pid == -1:
            return self.age > UNREADABLE_GRACE
        if self.hostname == hostname():
            return not pid_alive(self.pid, self.proc_start)
        return self.age > stale_after

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.hostname} since {since}"


def payload(note: dict[str, Any]) -> bytes:
    """The content of a lock taken by this process now."""
    data = {
        "pid": os.getpid(),
        "hostname": hostname(),
        "started": time.time(),
        "proc_start": proc_start_time(os.getpid()),
        **note,
    }
    return (json.dumps(data) + "\n").encode()


def read(path: Path) -> LockInfo | None:
    """The lock at ``path``; None if there is none. A file that cannot be parsed reads as pid -1."""
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


def held(path: Path, stale_after: float = DEFAULT_STALE_AFTER) -> LockInfo | None:
    """The live holder of the lock at ``path``, or None when it is free or stale."""
    info = read(path)
    return None if info is None or info.is_stale(stale_after) else info
