"""Run locks: exclusive, broken when stale (dead holder here, silent holder elsewhere), never stolen live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.runs import folder as RF
from experiments.runs import lockfile, locks

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "pid": os.getpid(),
        "hostname": locks.hostname(),
        "started": time.time(),
        "proc_start": None,
        **fields,
    }
    path = run_dir / RF.LOCK
    path.write_text(json.dumps(data))
    return path


def test_lock_is_exclusive_and_released(tmp_path):
    a, b = locks.RunLock(tmp_path / "run"), locks.RunLock(tmp_path / "run")
    assert a.acquire()
    info = json.loads((tmp_path / "run" / "run.lock").read_text())
    assert info["pid"] == os.getpid() and info["hostname"] == locks.hostname() and info["started"] > 0
    assert not b.acquire()
    assert locks.lock_is_held(tmp_path / "run") is not None
    a.release()
    assert not (tmp_path / "run" / "run.lock").exists()
    assert b.acquire()
    b.release()


def test_context_manager_raises_when_busy(tmp_path):
    with locks.RunLock(tmp_path) as held:
        assert held.held
        try:
            with locks.RunLock(tmp_path):
                raise AssertionError("took a held lock")
        except locks.LockBusy as err:
            assert f"pid {os.getpid()}" in str(err)
    assert not (tmp_path / "run.lock").exists()


def test_lock_of_a_dead_process_here_is_broken(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    assert locks.lock_is_held(tmp_path) is None
    lock = locks.RunLock(tmp_path)
    assert lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_does_not_keep_a_lock(tmp_path):
    """Our own pid, but a process start time that is not ours: the holder died and its pid was reused."""
    start = lockfile.proc_start_time(os.getpid())
    if start is None:
        return  # no /proc
    _write_lock(tmp_path, proc_start=start - 1)
    assert locks.RunLock(tmp_path).acquire()


def test_zombie_holder_counts_as_dead(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{proc.pid}/stat").is_file():
        if Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.02)
    try:
        if Path(f"/proc/{proc.pid}").is_dir():  # exited but not reaped: a zombie
            assert not lockfile.pid_alive(proc.pid)
    finally:
        proc.wait()


def test_lock_on_another_host_is_trusted_until_its_heartbeat_stops(tmp_path):
    path = _write_lock(tmp_path, pid=1, hostname="some-other-node")
    assert not locks.RunLock(tmp_path, stale_after=60).acquire()
    assert locks.lock_is_held(tmp_path, stale_after=60) is not None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert locks.lock_is_held(tmp_path, stale_after=60) is None
    lock = locks.RunLock(tmp_path, stale_after=60)
    assert lock.acquire()
    lock.release()


def test_heartbeat_touches_the_lock(tmp_path):
    lock = locks.RunLock(tmp_path)
    assert lock.acquire()
    old = time.time() - 500
    os.utime(lock.path, (old, old))
    lock.heartbeat(force=True)
    assert time.time() - lock.path.stat().st_mtime < 60
    lock.release()


def test_half_written_lock_is_busy_then_stale(tmp_path):
    path = tmp_path / RF.LOCK
    path.write_text("")
    assert not locks.RunLock(tmp_path).acquire()  # its holder may be writing it right now
    old = time.time() - 60
    os.utime(path, (old, old))
    assert locks.RunLock(tmp_path).acquire()


def test_release_never_removes_someone_elses_lock(tmp_path):
    lock = locks.RunLock(tmp_path)
    assert lock.acquire()
    _write_lock(tmp_path, pid=1, hostname="some-other-node")  # replaced behind our back
    lock.release()
    assert (tmp_path / RF.LOCK).exists()


RACE = """
import sys, time
from experiments.runs import locks
t0 = float(sys.argv[2])
while time.time() < t0:
    pass
lock = locks.RunLock(sys.argv[1])
got = lock.acquire()
print("got" if got else "busy", flush=True)
time.sleep(1.5)  # hold it while the others try
"""


def _race(run_dir: Path, n: int = 4) -> list[str]:
    t0 = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(run_dir), str(t0)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(n)
    ]
    return [p.communicate(timeout=60)[0].strip() for p in procs]


def test_concurrent_processes_take_a_free_lock_once(tmp_path):
    assert sorted(_race(tmp_path / "run")) == ["busy", "busy", "busy", "got"]


def test_concurrent_processes_break_a_stale_lock_once(tmp_path):
    _write_lock(tmp_path / "run", pid=_dead_pid())
    assert sorted(_race(tmp_path / "run")) == ["busy", "busy", "busy", "got"]
