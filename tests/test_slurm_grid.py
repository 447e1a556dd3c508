"""``tlit grid run --launcher slurm`` on the real one-node cluster (scripts/slurm-cluster.sh): real sbatch,
slurmctld and slurmd, no accounting; tiny runs (tens of steps) on its 2 CPUs.

What a user sees: one job array, SLURM's state beside ours in ``grid status``, a rerun that submits nothing
(or only what is unfinished), cancellation read as interrupted, preemption both ways SLURM does it (the
task resumes from its checkpoint and ends where an uninterrupted run ends), time limits up to
``--max-requeues``, and bad input refused in one line before anything is submitted.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from experiments.launchers import slurm as S
from experiments.runs import folder as RF
from tests.slurm_cluster import cancel_all, our_jobs, squeue, tlit, tlit_background, wait_for, write_grid

pytestmark = pytest.mark.slurm

QUICK = {f"q{i}": {"train.max_steps": 4} for i in range(1, 5)}
QUICK["q2"]["model.num_heads"] = 4
QUICK["q3"]["model.d_ff"] = 1024
QUICK["q4"]["model.dropout"] = 0.2
SLOW = {"s1": {"train.max_steps": 3000}, "s2": {"train.max_steps": 3000, "model.num_heads": 4}}


def grid_args(grid: Path, tmp: Path, rows: str, *extra: str) -> list[str]:
    return [
        "grid",
        "run",
        str(grid),
        "--rows",
        rows,
        "--launcher",
        "slurm",
        "--runs",
        str(tmp / "runs"),
        "--slurm-folder",
        str(tmp / "slurm"),
        f"data.cache_dir={tmp / 'cache'}",
        *extra,
    ]


def status(grid: Path, tmp: Path, rows: str) -> dict[str, list[str]]:
    """``tlit grid status``: run row -> its words (state, slurm task, slurm state, ...)."""
    out = tlit("grid", "status", str(grid), "--rows", rows, "--runs", str(tmp / "runs"), cwd=tmp, timeout=60)
    assert out.returncode == 0, out.stderr
    return {
        m.group(1): line.split()[1:]
        for line in out.stdout.splitlines()
        if (m := re.match(r"micro/micro/(\w+)/", line))
    }


def run_dir(tmp: Path, row: str) -> Path:
    return tmp / "runs" / "micro" / "micro" / row / "seed0"


def task_of(tmp: Path, row: str) -> str:
    recorded = RF.read_slurm_job(run_dir(tmp, row))
    assert recorded is not None, f"{row} was not submitted"
    return recorded[0]


def submissions(tmp: Path) -> list[Path]:
    return sorted((tmp / "slurm").rglob("*_submission.sh"))


def test_grid_array_status_rerun_and_cancel(slurm_cluster: Path, tmp_path: Path):
    grid = write_grid(tmp_path, {**QUICK, **SLOW})
    quick = ",".join(QUICK)
    try:
        first = tlit(
            *grid_args(grid, tmp_path, quick, "--no-wait", "--time", "10", "--mem", "1.5"), cwd=tmp_path
        )
        assert first.returncode == 0, first.stdout + first.stderr
        assert "CPU-only tasks" in first.stdout  # the test cluster has no GPU: no --gpus-per-node
        tasks = {row: task_of(tmp_path, row) for row in QUICK}
        arrays = {t.split("_")[0] for t in tasks.values()}
        assert len(arrays) == 1 and len(submissions(tmp_path)) == 1, tasks  # one job array
        script = submissions(tmp_path)[0].read_text()
        assert "#SBATCH --mem=1536M" in script and "gpus" not in script

        # while it runs: SLURM's task and state beside ours
        seen = status(grid, tmp_path, quick)
        for row, words in seen.items():
            if words[0] == "complete":  # a fast machine
                continue
            ours, task, theirs = words[:3]
            assert task == tasks[row] and ours in ("pending", "running", "complete"), words
            assert theirs in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED"), words
        assert {w[2] for w in seen.values()} & {"PENDING", "RUNNING"}, seen

        # a rerun while they are queued or running submits nothing
        again = tlit(*grid_args(grid, tmp_path, quick, "--no-wait", "--time", "10"), cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(submissions(tmp_path)) == 1 and "not submitted again" in again.stderr, again.stderr

        def finished(row: str) -> bool:  # the summary is written, and the task has let go of the run
            return RF.read_summary(run_dir(tmp_path, row)) and not (run_dir(tmp_path, row) / RF.LOCK).exists()

        wait_for(lambda: all(finished(r) for r in QUICK), 300, "the quick runs")
        for row in QUICK:
            summary = RF.read_summary(run_dir(tmp_path, row))
            assert summary["status"] == "complete" and summary["train_steps"] == 4 and summary["row"] == row
        assert all(w[0] == "complete" for w in status(grid, tmp_path, quick).values())

        # cancellation: the whole array while its runs train; only the unfinished runs are submitted again
        every = ",".join([*QUICK, *SLOW])
        more = tlit(*grid_args(grid, tmp_path, every, "--no-wait"), cwd=tmp_path)
        assert more.returncode == 0, more.stdout + more.stderr
        assert "4 of 6 runs already complete" in more.stdout and len(submissions(tmp_path)) == 2
        slow = {row: task_of(tmp_path, row) for row in SLOW}

        def training() -> bool:
            words = status(grid, tmp_path, ",".join(SLOW))
            has_checkpoint = all((run_dir(tmp_path, r) / RF.CKPT_DIR / RF.LAST_CKPT).is_file() for r in SLOW)
            return has_checkpoint and all(w[0] == "running" and w[2] == "RUNNING" for w in words.values())

        wait_for(training, 240, "both slow runs to train past a checkpoint", every=1.0)
        subprocess.run(["scancel", next(iter(slow.values())).split("_")[0]], check=True)
        wait_for(
            lambda: all(squeue(t.split("_")[0]).get(t) == "CANCELLED" for t in slow.values()),
            60,
            "the array to be cancelled",
        )
        # the task frees the run when its training process has stopped, or SLURM's SIGKILL leaves a lock
        # whose holder is dead: interrupted either way, never running
        wait_for(
            lambda: all(w[0] != "running" for w in status(grid, tmp_path, ",".join(SLOW)).values()), 60, ""
        )
        after = status(grid, tmp_path, every)
        for row in SLOW:
            assert after[row][:3] == ["interrupted", slow[row], "CANCELLED"], after[row]
        assert all(after[row][0] == "complete" for row in QUICK)

        rerun = tlit(*grid_args(grid, tmp_path, every, "--no-wait"), cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "4 of 6 runs already complete" in rerun.stdout and len(submissions(tmp_path)) == 3
        resubmitted = {row: task_of(tmp_path, row) for row in SLOW}
        assert {t.split("_")[0] for t in resubmitted.values()} - {t.split("_")[0] for t in slow.values()}
    finally:
        cancel_all(
            r[0] for d in (tmp_path / "runs").rglob(RF.SLURM_JOB) if (r := RF.read_slurm_job(d.parent))
        )


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        ([], {"PATH": "/nonexistent"}, "sbatch is not on PATH"),
        (["--partition", "nope"], {}, "sbatch: error: invalid partition specified: nope"),
        (["--time", "0"], {}, "--time must be at least 1"),
        (["--devices", "cuda", "train.devices=2"], {}, "has none (sinfo lists no gpu gres)"),
        (["train.devices=2", "train.accelerator=cuda"], {}, "train.accelerator=cuda asks for GPUs"),
    ],
    ids=["no-sbatch", "unknown-partition", "time-0", "devices-cuda", "accelerator-cuda"],
)
def test_bad_input_is_one_line_and_submits_nothing(
    slurm_cluster: Path, tmp_path: Path, extra: list[str], env: dict, message: str
):
    grid = write_grid(tmp_path, QUICK)
    before = our_jobs()
    out = tlit(*grid_args(grid, tmp_path, "q1", "--no-wait", *extra), cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlit grid: error:") and message in lines[0], out.stderr
    assert our_jobs() == before and not submissions(tmp_path)
    assert not list((tmp_path / "runs").rglob(RF.SLURM_JOB)) if (tmp_path / "runs").exists() else True


def steps_in(run: Path) -> list[int]:
    """The checkpoint steps a run's periodic checkpoints are named after."""
    return sorted(
        s for p in (run / RF.CKPT_DIR).glob("step=*.ckpt") if (s := RF.periodic_step(p)) is not None
    )


def resumed_from(run: Path) -> list[int]:
    """Steps each resumed segment started from (``resuming ... (step N)`` lines of train.log)."""
    text = (run / RF.LOG).read_text() if (run / RF.LOG).is_file() else ""
    return [int(n) for n in re.findall(r"resuming .* \(step (\d+)\)", text)]


def first_steps(run: Path) -> int:
    log = run / RF.LOG
    return log.read_text().count("first training step") if log.is_file() else 0


def val_rows(run: Path) -> list[tuple[str, ...]]:
    """metrics.csv's rows as written, but the epoch (Lightning's epoch counter differs after a resume)."""
    with (run / RF.METRICS).open(newline="") as fh:
        return [tuple(v for k, v in row.items() if k != "epoch") for row in csv.DictReader(fh)]


def test_preempted_task_resumes_from_its_checkpoint_both_ways(slurm_cluster: Path, tmp_path: Path):
    """``scontrol requeue`` (SIGTERM, SLURM requeues) and then ``scancel --signal=USR2`` (our checkpoint
    handler requeues) hit the same run while it trains; it comes back each time from its last checkpoint
    and ends exactly where the same config ends uninterrupted (row ``twin``, same array)."""
    cells = {"train.max_steps": 200}
    grid = write_grid(tmp_path, {"victim": cells, "twin": dict(cells)})
    victim, twin = run_dir(tmp_path, "victim"), run_dir(tmp_path, "twin")
    waiting = tlit_background(*grid_args(grid, tmp_path, "victim,twin"), cwd=tmp_path)  # waits for the array
    try:
        wait_for(lambda: RF.read_slurm_job(victim), 60, "the array to be submitted")
        task = task_of(tmp_path, "victim")
        wait_for(
            lambda: steps_in(victim) and not RF.read_summary(victim), 240, "a first checkpoint", every=0.1
        )
        before = steps_in(victim)[-1]
        requeued_at = time.monotonic()
        subprocess.run(["scontrol", "requeue", task], check=True)
        wait_for(lambda: first_steps(victim) >= 2, 240, "the requeued task to train again", every=0.2)
        latency = time.monotonic() - requeued_at
        print(f"requeue latency (scontrol requeue -> first new training step): {latency:.1f} s")
        (first,) = resumed_from(victim)
        assert first >= before >= 10  # from its last checkpoint: at most checkpoint_every_n_steps redone

        wait_for(lambda: steps_in(victim)[-1] > first, 240, "a checkpoint after the resume", every=0.1)
        before = steps_in(victim)[-1]
        subprocess.run(["scancel", "--signal=USR2", task], check=True)
        wait_for(lambda: first_steps(victim) >= 3, 240, "the task to come back after USR2", every=0.2)
        log = (victim / RF.LOG).read_text()
        assert S.STOPPED_LINE.format(signal="SIGUSR2", why="time limit or preemption") in log
        second = resumed_from(victim)[1]
        assert second >= before > first

        out, _ = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
        cancel_all([task_of(tmp_path, "victim")] if RF.read_slurm_job(victim) else [])
    assert waiting.returncode == 0, out
    a, b = RF.read_summary(twin), RF.read_summary(victim)
    assert a["train_steps"] == b["train_steps"] == 200
    assert b["ppl_dev"] == pytest.approx(a["ppl_dev"], rel=1e-9, abs=0)
    # metrics.csv continues across the segments: every logged step once, the same values as the twin's
    assert val_rows(victim) == val_rows(twin)
    # the reported time covers every segment: more than the last one (from its header to the end)
    line = next(x for x in out.splitlines() if x.startswith("micro/micro/victim/seed0"))
    minutes, seconds = re.search(r"time=(?:(\d+)m)?(\d+)s", line).groups()  # fmt_seconds: 48s, 1m05s
    reported = 60 * int(minutes or 0) + int(seconds)
    headers = re.findall(r"attempt \d+/\d+ at (\S+ \S+) on", (victim / RF.LOG).read_text())
    last_start = time.mktime(time.strptime(headers[-1], "%Y-%m-%d %H:%M:%S"))
    last_segment = (victim / RF.SUMMARY).stat().st_mtime - last_start
    assert reported > last_segment + 2, (reported, last_segment)


def test_time_limit_requeues_up_to_max_requeues_then_fails(slurm_cluster: Path, tmp_path: Path):
    """``--time 2 --signal-delay 60``: SLURM sends USR2 about a minute into each task (up to 30 s earlier:
    slurmctld looks at time limits every 30 s); our checkpoint handler stops the run and submitit requeues
    it; the next segment resumes from the checkpoint. A run that never finishes is marked failed, with the
    reason, once ``--max-requeues 1`` time limits are used up. (That a requeued run then completes is shown by
    the preemption test, the same handler and requeue, and by test_slurm.py's local-executor timeout.)"""
    grid = write_grid(tmp_path, {"endless": {"train.max_steps": 100000}})
    endless = run_dir(tmp_path, "endless")
    limits = ["--no-wait", "--time", "2", "--signal-delay", "60", "--max-requeues", "1"]
    try:
        out = tlit(*grid_args(grid, tmp_path, "endless", *limits), cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: (endless / RF.FAILED).is_file(), 300, "endless to be marked failed", every=1.0)
        reason = json.loads((endless / RF.FAILED).read_text())["error"]
        assert reason.startswith("timed out more than --max-requeues 1 times"), reason
        log = (endless / RF.LOG).read_text()
        assert log.count(S.STOPPED_LINE.format(signal="SIGUSR2", why="time limit or preemption")) == 2
        assert "not requeued: timed out more than --max-requeues 1 times" in log
        (resumed,) = resumed_from(endless)  # the second segment went on from the first one's checkpoint
        assert resumed >= 10
        words = status(grid, tmp_path, "endless")["endless"]
        assert words[0] == "failed" and "--max-requeues 1" in " ".join(words), words
    finally:
        cancel_all(
            r[0] for d in (tmp_path / "runs").rglob(RF.SLURM_JOB) if (r := RF.read_slurm_job(d.parent))
        )
