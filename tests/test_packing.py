"""Several jobs per GPU (issue 15, point 1), on CPU: the visible-GPU list, the card size and the core count
are injected (a GPU request without a GPU is otherwise an error, tests/test_gpu_requests.py). The children
are real processes that print their CUDA_VISIBLE_DEVICES and thread count and sleep; the tests read what
each child saw and when it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.launchers import base as B
from experiments.launchers import local
from experiments.launchers.calibration import load_calibration, write_calibration
from experiments.sweeps import file as sweep_file
from tests.test_sweep import ROOT, write_sweep

GB = 10**9
CHILD = (
    "import os, sys, time, json; t0 = time.time(); "
    "cvd, omp = os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS']; "
    "print(f'CVD={cvd}|OMP={omp}|', flush=True); "
    "time.sleep(float(sys.argv[2])); "
    "summary = {'status': 'complete', 'start': t0, 'end': time.time()}; "
    "json.dump(summary, open(sys.argv[1] + '/summary.json', 'w'))"
)


def child_job(tmp_path: Path, name: str, devices: int, cost: float, seconds: float = 0.6) -> B.Job:
    run_dir = tmp_path / name
    argv = [sys.executable, "-c", CHILD, str(run_dir), str(seconds)]
    return B.Job(name, argv, run_dir, slots=devices, cost=cost)


def seen(job: B.Job) -> tuple[list[str], int, float, float]:
    """(GPU ids, threads, start, end) the child reported."""
    cvd, omp = job.log_path.read_text().split("CVD=")[1].split("|")[:2]
    summary = json.loads((job.run_dir / "summary.json").read_text())
    return cvd.split(","), int(omp.removeprefix("OMP=")), summary["start"], summary["end"]


@pytest.fixture()
def sixteen_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "cpu_count", lambda: 16)


def test_packed_jobs_share_gpus_with_a_split_of_the_threads(tmp_path, sixteen_cores) -> None:
    """2 GPUs x 2 seats, 5 one-GPU jobs: 4 run at once (2 per GPU, spread), the 5th waits; each child holds
    one GPU id and 16 cores / 4 seats = 4 threads."""
    jobs = [child_job(tmp_path, f"j{i}", 1, cost=5 - i) for i in range(5)]
    results = local.LocalLauncher(local.Slots("cuda", ("0", "1"), per_device=2), poll=0.05).run(jobs)
    assert all(r.state == B.JobState.DONE for r in results), results
    got = {j.name: seen(j) for j in jobs}
    assert all(len(ids) == 1 and ids[0] in ("0", "1") and threads == 4 for ids, threads, *_ in got.values())
    assert [got[f"j{i}"][0][0] for i in range(4)] == ["0", "1", "0", "1"]  # longest first, spread out
    for gpu in ("0", "1"):  # never more than 2 at once on one GPU
        spans = [(s, e) for ids, _, s, e in got.values() if ids == [gpu]]
        assert all(sum(s < t < e for s, e in spans) <= 2 for t, _ in spans), spans
    first_end = min(e for *_, e in list(got.values())[:4])
    assert got["j4"][2] >= first_end - 0.05  # the fifth started when a seat freed


def test_multi_gpu_jobs_take_whole_gpus_longest_first(tmp_path, sixteen_cores) -> None:
    """3 GPUs x 2 seats: the longest job (2 GPUs) takes two whole GPUs with 16/3 = 5 threads per process;
    the one-GPU jobs share the third GPU (2 threads each) and never a GPU of the 2-GPU job while it runs."""
    jobs = [child_job(tmp_path, "pair", 2, cost=9, seconds=1.0)]
    jobs += [child_job(tmp_path, f"one{i}", 1, cost=3 - i / 10, seconds=0.4) for i in range(4)]
    results = local.LocalLauncher(local.Slots("cuda", ("0", "1", "2"), per_device=2), poll=0.05).run(jobs)
    assert all(r.state == B.JobState.DONE for r in results), results
    got = {j.name: seen(j) for j in jobs}
    pair_ids, pair_threads, pair_start, pair_end = got["pair"]
    assert sorted(pair_ids) == ["0", "1"] and pair_threads == 5
    for name in (f"one{i}" for i in range(4)):
        ids, threads, start, end = got[name]
        assert len(ids) == 1 and threads == 2
        if start < pair_end and end > pair_start:  # ran alongside the pair: only on the free GPU
            assert ids == ["2"], (name, ids)


def test_a_two_gpu_job_waits_for_two_whole_gpus(tmp_path, sixteen_cores) -> None:
    """2 GPUs x 4 seats, a one-GPU job running on each: the 2-GPU job (next longest) waits until both GPUs
    are whole again although 6 seats are free; shorter one-GPU jobs may backfill only seats that do not
    delay it."""
    jobs = [child_job(tmp_path, f"a{i}", 1, cost=10, seconds=0.8) for i in range(2)]
    jobs.append(child_job(tmp_path, "pair", 2, cost=5, seconds=0.3))
    results = local.LocalLauncher(local.Slots("cuda", ("0", "1"), per_device=4), poll=0.05).run(jobs)
    assert all(r.state == B.JobState.DONE for r in results), results
    got = {j.name: seen(j) for j in jobs}
    assert sorted(got["pair"][0]) == ["0", "1"] and got["pair"][1] == 8
    assert got["pair"][2] >= max(got["a0"][3], got["a1"][3]) - 0.05


def test_check_packing_refuses_what_cannot_fit_in_one_line() -> None:
    slots = local.Slots("cuda", ("0",), per_device=4, memory=4 * GB)
    runs = [("table3/tiny/big/seed0", int(1.2 * GB))] + [(f"r{i}", int(1.1 * GB)) for i in range(5)]
    with pytest.raises(ValueError) as err:
        local.check_packing(slots, runs)
    assert str(err.value) == (
        "--jobs-per-device 4: 4 runs such as table3/tiny/big/seed0 (~1.2 GB each) need ~4.5 GB on one GPU "
        "of 4.0 GB; use --jobs-per-device 3 or fewer"
    )
    local.check_packing(local.Slots("cuda", ("0",), per_device=3, memory=4 * GB), runs)  # 3.4 GB fits
    local.check_packing(local.Slots("cuda", ("0",), per_device=8, memory=None), runs)  # unknown card: trust


def test_jobs_per_device_forms(monkeypatch) -> None:
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(local, "gpu_memory", lambda: 141 * GB)
    slots = local.parse_devices("cuda:all", 4)
    assert slots == local.Slots("cuda", ("0", "1"), per_device=4, memory=141 * GB)
    assert len(slots) == 8 and str(slots) == "cuda:0,1 x4 jobs each"
    assert slots.seat_ids() == ["0", "1"] * 4
    with pytest.raises(ValueError, match="^--jobs-per-device must be a positive integer, got 0$"):
        local.parse_devices("cuda:all", 0)
    with pytest.raises(ValueError, match="packs jobs on GPUs, but --devices 'cpu:2' gives CPU slots"):
        local.parse_devices("cpu:2", 2)


@pytest.fixture()
def two_small_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(local, "gpu_memory", lambda: 4 * GB)


def test_grid_run_refuses_an_overfull_packing_before_writing(tmp_path, capsys, two_small_gpus) -> None:
    runs = tmp_path / "runs"
    argv = ["grid", "run", "table3", "--scale", "tiny", "--devices", "cuda:all", "--runs", str(runs)]
    assert main([*argv, "--jobs-per-device", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tlit grid: error: --jobs-per-device 4: 4 runs")
    assert err.endswith("use --jobs-per-device 3 or fewer") and not runs.exists()


def test_grid_plan_shows_packing_memory_disk_and_calibration(tmp_path, capsys, two_small_gpus) -> None:
    calibration = tmp_path / "h200.json"
    write_calibration(
        calibration,
        "NVIDIA H200",
        [
            {"name": "tiny", "params": 7.6e5, "tokens_per_s": 1e5},
            {"name": "big", "params": 2.1e8, "tokens_per_s": 5e4},
        ],
        {1: 1.0, 2: 2.0, 4: 2.0},
    )
    argv = ["grid", "plan", "table3", "--scale", "tiny", "--rows", "base,big", "--devices", "cuda:all"]
    argv += ["--runs", str(tmp_path / "runs"), "--jobs-per-device", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "memory" in out and "ckpt disk" in out
    assert "checkpoints: 787.1 MB for the runs to do, 787.1 MB for all" in out  # base 55.0 MB + big 732.1 MB
    assert "packing: 4 one-GPU job(s) per GPU; the 2 largest need ~2.3 GB of a 4.0 GB GPU" in out
    assert "GPUs a fixed factor faster" in out
    assert main([*argv, "--calibration", str(calibration)]) == 0
    out = capsys.readouterr().out
    assert f"measured on NVIDIA H200 ({calibration})" in out
    # base: 8 s overhead + 764,416 params x 480 tokens x 700 steps / 1e5 params-tokens/s / 764,416 params
    # x (4 jobs / 2.0 packing speedup) = 8 + 3.36 x 2 = 15 s
    assert " 15s " in out.splitlines()[1], out


def test_calibration_file_errors_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"throughput": [{"params": 1e6}]}')
    with pytest.raises(ValueError, match=r"throughput\[0\] needs positive numbers params and tokens_per_s"):
        load_calibration(bad)
    with pytest.raises(ValueError, match="no such file"):
        load_calibration(tmp_path / "missing.json")
    cal = tmp_path / "ok.json"
    points = [{"params": 1e6, "tokens_per_s": 1e6}, {"params": 1e8, "tokens_per_s": 1e5}]
    write_calibration(cal, "GPU", points, {})
    c = load_calibration(cal)
    assert c.seconds_per_param_token(1e7) == pytest.approx((1e-12 + 1e-13) / 2)  # halfway in log(params)
    assert c.seconds_per_param_token(1e3) == pytest.approx(1e-12) and c.packed_slowdown(4) == 4.0


def test_sweep_workers_packed_on_fake_gpus(tmp_path) -> None:
    """``tlit sweep --devices cuda:all --jobs-per-device 2`` with two fake GPUs (CUDA_VISIBLE_DEVICES):
    4 workers, two per GPU, each trial run with one GPU id and the cores split between 4 seats."""
    path = write_sweep(tmp_path, trials=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0,1", "TLIT_SWEEP_STANDIN": "0.2"}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "sweep", str(path), "--devices", "cuda:all"]
        + ["--jobs-per-device", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    spec = sweep_file.load_sweep(path)
    assert f"{spec.study}: 4 workers on cuda:0,1 x2 jobs each" in done.stdout
    logs = tmp_path / "results/sweeps" / spec.study / "workers"
    headers = [(logs / f"worker{i}.log").read_text().split(" on ")[1].split()[0] for i in range(4)]
    assert headers == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    ledgers = (tmp_path / "results/runs").rglob("standin.log")
    lines = [ln for f in ledgers for ln in f.read_text().splitlines()]
    threads = max(1, local.cpu_count() // 4)
    assert len(lines) >= 8 and all(ln.split()[3] in ("cuda=0", "cuda=1") for ln in lines)
    assert all(ln.split()[4] == f"threads={threads}" for ln in lines), lines


def test_slurm_array_task_trains_its_packed_runs_at_once(tmp_path) -> None:
    """--launcher slurm --jobs-per-device 2 (submitit's local executor): 3 one-GPU runs make 2 array tasks;
    the first trains its 2 runs at once, each with half the task's CPUs and the task's GPU (the executor
    sets the task's CUDA_VISIBLE_DEVICES, as SLURM does; the runs inherit it)."""
    pytest.importorskip("submitit")
    from experiments.launchers import slurm as S

    jobs = [
        child_job(tmp_path / "runs", n, 1, cost=c, seconds=1.0) for n, c in (("a", 3), ("b", 2), ("c", 1))
    ]
    opts = S.SlurmOptions(folder=tmp_path / "slurm", gpus=False, cpus_per_gpu=4, jobs_per_device=2)
    launcher = S.SlurmLauncher(opts, cluster="local", poll=0.2)
    results = {r.name: r for r in launcher.run(jobs)}
    assert all(r.state == B.JobState.DONE for r in results.values()), results
    assert len(launcher.job_ids) == 2  # [a, b] and [c]
    got = {j.name: seen(j) for j in jobs}
    assert {n: g[1] for n, g in got.items()} == {"a": 2, "b": 2, "c": 4}
    assert got["a"][0] == got["b"][0]  # one task, one GPU
    assert got["a"][2] < got["b"][3] and got["b"][2] < got["a"][3]  # a and b overlapped in time
