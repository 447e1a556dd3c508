"""A run that makes no progress is killed and retried like a crash (issue 12, "Should fix"): the stall
watchdog (experiments/runs/watchdog.py). Real Lightning DDP on CPU: 2 gloo ranks under the local launcher.

Rank 1 is stopped (SIGSTOP) once it trains: it is as good as dead, but its sockets stay open, so rank 0
waits in its next all-reduce forever, as the ranks of a multi-node run do when a node vanishes. (A rank
SIGKILLed on the same node closes its sockets: gloo fails at once and Lightning's observer kills the rest;
that is a plain crash.) Without the watchdog this test hangs until its timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.runs import folder as RF
from experiments.runs.watchdog import EXIT_STALLED, descendants

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.synthetic_pairs=300",
    "data.synthetic_eval_pairs=20",
    "model.num_layers=1",
    "train.max_steps=300",
    "train.val_every_n_steps=100",
    "train.checkpoint_every_n_steps=20",
    "eval.max_sentences=20",
    "train.wandb=false",
    "train.devices=2",
    "train.stall_timeout=0.1",  # 6 s (the default is 30 min)
]


def rank_one(grid_pid: int) -> int | None:
    """The pid of DDP rank 1 among the grid's processes (Lightning starts it with LOCAL_RANK=1)."""
    for pid in descendants(grid_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"LOCAL_RANK=1" in env:
            return pid
    return None


@pytest.mark.slow
def test_a_stalled_ddp_run_is_killed_and_retried(tmp_path):
    run_dir = tmp_path / "table3" / "tiny" / "C1" / "seed0"
    argv = [
        sys.executable,
        "-m",
        "experiments.cli",
        "grid",
        "run",
        "table3",
        "--scale",
        "tiny",
        "--rows",
        "C1",
    ]
    argv += ["--devices", "cpu:2", "--runs", str(tmp_path), "--retries", "1", *MICRO]
    grid = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while stopped is None and time.monotonic() < deadline and grid.poll() is None:
            log = run_dir / RF.LOG
            if log.is_file() and "first training step on rank 1" in log.read_text():
                stopped = rank_one(grid.pid)
                if stopped is not None:
                    subprocess.run(["kill", "-STOP", str(stopped)], check=True)
            time.sleep(0.05)
        assert stopped is not None, "rank 1 never trained"
        out, _ = grid.communicate(timeout=400)
    finally:
        if grid.poll() is None:
            grid.kill()
    log = (run_dir / RF.LOG).read_text()
    assert grid.returncode == 0, out + log[-3000:]
    assert "stalled: no training step for 0.1 min (train.stall_timeout=0.1)" in log, log[-3000:]
    assert "killing pid" in log and str(stopped) in log  # rank 0 took its stopped rank 1 down with it
    assert f"exited with status {EXIT_STALLED}: stalled: no training step" in out, out
    assert "attempt 2/2" in log and "attempts=2" in out
    assert (
        not Path(f"/proc/{stopped}").exists() or "Z" in Path(f"/proc/{stopped}/stat").read_text().split()[2]
    )
    summary = json.loads((run_dir / RF.SUMMARY).read_text())
    assert summary["status"] == "complete" and summary["train_steps"] == 300
