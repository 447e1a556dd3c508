"""The local launcher on fake jobs (short Python sleeps): slots, longest-first order, k-slot jobs, retries,
failures, interrupts, SIGKILL of the grid and two grids over the same runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.launchers import base as B
from experiments.launchers import local
from experiments.runs import lockfile

ROOT = Path(__file__).resolve().parents[1]


def read_ledger(path: Path) -> list[tuple[str, str, int, float]]:
    """(event, run name, pid, time) lines written by the fake jobs."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, run_dir, pid, t = line.split()
        out.append((what, Path(run_dir).name, int(pid), float(t)))
    return out


def events(ledger: Path, what: str, name: str) -> list[tuple[str, str, int, float]]:
    return [e for e in read_ledger(ledger) if e[0] == what and e[1] == name]


# ----------------------------------------------------------------------------------------------------------
# Slots


def test_parse_devices_cpu_forms(monkeypatch):
    assert local.parse_devices("cpu:2") == local.Slots("cpu", ("cpu0", "cpu1"))
    assert len(local.parse_devices("cpu:all")) == local.cpu_count()
    monkeypatch.setattr(local, "visible_gpus", lambda: [])
    assert local.parse_devices("all") == local.Slots(
        "cpu", tuple(f"cpu{i}" for i in range(local.cpu_count()))
    )


def test_parse_devices_gpu_forms(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert local.parse_devices("all") == local.Slots("cuda", ("0", "1", "2", "3"))
    assert local.parse_devices("cuda:all") == local.Slots("cuda", ("0", "1", "2", "3"))
    assert local.parse_devices("cuda:0,1") == local.Slots("cuda", ("0", "1"))
    assert local.parse_devices("cuda:2") == local.Slots("cuda", ("2",))


def test_cuda_ids_count_among_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert local.visible_gpus() == ["4", "6"]
    assert local.parse_devices("cuda:1") == local.Slots("cuda", ("6",))
    with pytest.raises(ValueError, match="only 2 GPU"):
        local.parse_devices("cuda:0,2")


@pytest.mark.parametrize(
    "spec", ["", "gpu", "cpu", "cpu:0", "cpu:-1", "cpu:x", "cuda:a", "cuda:0,0", "tpu:1", "2"]
)
def test_bad_device_specs_fail_in_one_line(spec, monkeypatch):
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0"])
    with pytest.raises(ValueError) as err:
        local.parse_devices(spec)
    message = str(err.value)
    assert "\n" not in message and "--devices" in message and "cpu:N" in message and "cuda:" in message


def test_cuda_all_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(local, "visible_gpus", lambda: [])
    with pytest.raises(ValueError, match="no GPU is visible"):
        local.parse_devices("cuda:all")


def test_children_env_and_overrides_per_slot_kind():
    cpu = local.LocalLauncher(local.Slots("cpu", ("cpu0", "cpu1")))
    env = cpu.env_for(("cpu0",))
    assert (
        env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    )
    assert {"train.accelerator=cpu", "train.num_threads=1", "train.progress_bar=false"} <= set(
        cpu.device_overrides()
    )
    gpu = local.LocalLauncher(local.Slots("cuda", ("0", "1", "2", "3")))
    assert gpu.env_for(("2", "3"))["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "train.accelerator=cpu" not in gpu.device_overrides()


# ----------------------------------------------------------------------------------------------------------
# Scheduling


def test_lpt_order_is_longest_first_and_stable(tmp_path):
    jobs = [B.Job(n, ["true"], tmp_path / n, cost=c) for n, c in [("a", 1), ("b", 5), ("c", 3), ("d", 5)]]
    assert [j.name for j in local.lpt_order(jobs)] == ["b", "d", "c", "a"]


def test_one_slot_runs_jobs_longest_first(tmp_path):
    ledger = tmp_path / "ledger"
    jobs = [
        B.fake_job(n, tmp_path / n, 0.05, cost=c, ledger=ledger) for n, c in [("s", 1), ("l", 9), ("m", 5)]
    ]
    results = local.LocalLauncher(local.parse_devices("cpu:1")).run(jobs)
    assert [r.state for r in results] == [B.JobState.DONE] * 3
    assert [e[1] for e in read_ledger(ledger) if e[0] == "start"] == ["l", "m", "s"]
    assert not any((tmp_path / n / "run.lock").exists() for n in "slm")


def test_two_slot_job_waits_for_two_free_slots(tmp_path):
    """long (1 slot) starts first; pair (2 slots) must wait for both slots; short backfills meanwhile
    because it should end before long does, and does not delay pair."""
    ledger = tmp_path / "ledger"
    jobs = [
        B.fake_job("long", tmp_path / "long", 1.2, cost=10, ledger=ledger),
        B.fake_job("pair", tmp_path / "pair", 0.2, cost=5, slots=2, ledger=ledger),
        B.fake_job("short", tmp_path / "short", 0.1, cost=0.5, ledger=ledger),
    ]
    results = local.LocalLauncher(local.parse_devices("cpu:2")).run(jobs)
    assert all(r.state == B.JobState.DONE for r in results)
    (pair_start,) = events(ledger, "start", "pair")
    (long_done,) = events(ledger, "done", "long")
    (short_start,) = events(ledger, "start", "short")
    (short_done,) = events(ledger, "done", "short")
    assert pair_start[3] >= long_done[3] and pair_start[3] >= short_done[3]
    assert short_start[3] < long_done[3]  # backfilled


def test_gpu_slots_are_disjoint_between_running_jobs(tmp_path):
    """Fake GPU slots (no GPU needed): each job logs its CUDA_VISIBLE_DEVICES while the others run."""
    code = (
        "import os, sys, time, json; print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'], flush=True); "
        "time.sleep(0.5); json.dump({'status': 'complete'}, open(sys.argv[1] + '/summary.json', 'w'))"
    )
    jobs = [
        B.Job(n, [sys.executable, "-c", code, str(tmp_path / n)], tmp_path / n, slots=s, cost=c)
        for n, s, c in [("a", 2, 3), ("b", 1, 2), ("c", 1, 1)]
    ]
    results = local.LocalLauncher(local.Slots("cuda", ("0", "1", "2", "3"))).run(jobs)
    assert all(r.state == B.JobState.DONE for r in results)
    seen = {j.name: j.log_path.read_text().split("CVD=")[1].split()[0].split(",") for j in jobs}
    assert len(seen["a"]) == 2 and len(seen["b"]) == 1 and len(seen["c"]) == 1
    assert len(set(seen["a"]) | set(seen["b"]) | set(seen["c"])) == 4  # all ran at once, on disjoint ids


def test_a_job_needing_more_slots_than_exist_is_refused(tmp_path):
    job = B.fake_job("big", tmp_path / "big", 0.1, slots=3)
    with pytest.raises(ValueError, match="needs 3 slots"):
        local.LocalLauncher(local.parse_devices("cpu:2")).run([job])


def test_failing_job_is_retried_then_marked_failed_while_others_finish(tmp_path):
    jobs = [
        B.fake_job("flaky", tmp_path / "flaky", 0.1, fail_times=1),
        B.fake_job("broken", tmp_path / "broken", 0.1, fail_times=99),
        B.fake_job("fine", tmp_path / "fine", 0.3),
        B.Job("silent", [sys.executable, "-c", "pass"], tmp_path / "silent"),  # exits 0, writes no summary
    ]
    results = {r.name: r for r in local.LocalLauncher(local.parse_devices("cpu:2"), retries=1).run(jobs)}
    assert results["flaky"].state == B.JobState.DONE and results["flaky"].attempts == 2
    assert results["fine"].state == B.JobState.DONE and results["fine"].attempts == 1
    assert results["broken"].state == B.JobState.FAILED and results["broken"].attempts == 2
    assert results["broken"].message == "exited with status 3"
    failed = json.loads((tmp_path / "broken" / "failed.json").read_text())
    assert failed["status"] == "failed" and "fake failure" in failed["log_tail"]
    assert len(failed["log_tail"].splitlines()) <= B.TAIL_LINES
    log = (tmp_path / "broken" / "train.log").read_text()
    assert "attempt 1/2" in log and "attempt 2/2" in log  # both attempts appended to one log
    assert results["silent"].state == B.JobState.FAILED and "summary.json" in results["silent"].message
    assert not any((tmp_path / n / "run.lock").exists() for n in ("flaky", "broken", "fine", "silent"))


def test_user_errors_are_not_retried(tmp_path):
    job = B.Job(
        "bad", [sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"], tmp_path / "bad"
    )
    (result,) = local.LocalLauncher(local.parse_devices("cpu:1"), retries=3).run([job])
    assert result.state == B.JobState.FAILED and result.attempts == 1


def test_complete_runs_are_skipped_and_progress_is_reported(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text('{"status": "complete"}')
    jobs = [B.fake_job("done", tmp_path / "done", 5), B.fake_job("todo", tmp_path / "todo", 0.1)]
    seen: list[B.Progress] = []
    results = local.LocalLauncher(local.parse_devices("cpu:1")).run(jobs, on_update=seen.append)
    assert [r.state for r in results] == [B.JobState.SKIPPED, B.JobState.DONE]
    assert seen and seen[-1].states == {"done": B.JobState.SKIPPED, "todo": B.JobState.DONE}
    assert any(p.running for p in seen)


# ----------------------------------------------------------------------------------------------------------
# Whole grids in their own processes: interrupts, SIGKILL, two grids at once

DRIVER = """
import json, sys
from experiments.launchers import base as B, local
spec = json.loads(sys.argv[1])
jobs = [B.fake_job(n, f"{spec['root']}/{n}", s, ledger=spec["ledger"]) for n, s in spec["jobs"]]
launcher = local.LocalLauncher(local.parse_devices(spec["devices"]), grace=spec.get("grace", 10))
results = launcher.run(jobs)
print(json.dumps({r.name: r.state.value for r in results}), flush=True)
if launcher.stopped_by is not None:
    sys.exit(128 + launcher.stopped_by)
sys.exit(0 if all(r.state.ok for r in results) else 1)
"""


def start_grid(tmp_path: Path, jobs: list[tuple[str, float]], devices: str = "cpu:2") -> subprocess.Popen:
    spec = {
        "root": str(tmp_path / "runs"),
        "ledger": str(tmp_path / "ledger"),
        "jobs": jobs,
        "devices": devices,
    }
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    return lockfile.pid_alive(pid)


def test_sigterm_kills_children_and_exits_cleanly(tmp_path):
    ledger = tmp_path / "ledger"
    grid = start_grid(tmp_path, [("a", 30), ("b", 30), ("c", 30)])
    wait_for(lambda: len([e for e in read_ledger(ledger) if e[0] == "start"]) == 2)
    grid.send_signal(signal.SIGTERM)
    out, _ = grid.communicate(timeout=30)
    assert grid.returncode == 128 + signal.SIGTERM
    assert json.loads(out) == {"a": "interrupted", "b": "interrupted", "c": "pending"}
    wait_for(lambda: not any(alive(e[2]) for e in read_ledger(ledger)), timeout=10)
    assert not list((tmp_path / "runs").glob("*/run.lock"))
    assert "interrupted by the grid" in (tmp_path / "runs" / "a" / "train.log").read_text()


def test_sigkill_of_the_grid_then_rerun_completes_without_repeating(tmp_path):
    ledger = tmp_path / "ledger"
    jobs = [("j0", 2.5), ("j1", 0.3), ("j2", 0.3), ("j3", 0.3), ("j4", 2.0), ("j5", 0.3)]
    grid = start_grid(tmp_path, jobs)
    wait_for(lambda: len([e for e in read_ledger(ledger) if e[0] == "done"]) >= 2)
    os.kill(grid.pid, signal.SIGKILL)
    grid.wait()
    before = read_ledger(ledger)
    done_before = {e[1] for e in before if e[0] == "done"}
    started = [e for e in before if e[0] == "start"]
    wait_for(lambda: not any(alive(e[2]) for e in started), timeout=10)  # children died with the grid
    assert len(done_before) >= 2
    # a SIGKILLed grid leaves its locks behind: stale (dead holder), so the rerun breaks them
    rerun = start_grid(tmp_path, jobs)
    out, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, (out, read_ledger(ledger))
    results = json.loads(out)
    after = read_ledger(ledger)[len(before) :]
    for name in done_before:
        assert results[name] == "skipped" and not [e for e in after if e[1] == name]
    for name, _ in jobs:
        assert json.loads((tmp_path / "runs" / name / "summary.json").read_text())["status"] == "complete"
        assert len([e for e in read_ledger(ledger) if e[0] == "done" and e[1] == name]) == 1
    interrupted = {e[1] for e in started} - done_before
    for name in interrupted:  # resumed from its "checkpoint", not restarted from zero
        assert results[name] == "done"
    assert not list((tmp_path / "runs").glob("*/run.lock"))


def test_two_grids_on_the_same_runs_never_run_one_twice(tmp_path):
    ledger = tmp_path / "ledger"
    jobs = [(f"j{i}", 0.2 + 0.1 * (i % 3)) for i in range(8)]
    grids = [start_grid(tmp_path, jobs), start_grid(tmp_path, jobs)]
    outs = [json.loads(g.communicate(timeout=90)[0]) for g in grids]
    assert all(g.returncode == 0 for g in grids)
    for name, _ in jobs:
        assert len(events(ledger, "start", name)) == 1, name
        assert len(events(ledger, "done", name)) == 1, name
        assert sorted(o[name] for o in outs) == ["done", "skipped"]  # one grid ran it, the other waited
