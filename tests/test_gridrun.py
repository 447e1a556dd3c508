"""``tlit grid run / status / plan``: run selection, states read from run folders, the plan without torch,
the jobs a grid builds, the progress display, and (slow) real grids on CPU, killed and resumed."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import cli
from experiments.grids import grid as G
from experiments.grids import runner as gridrun
from experiments.launchers import base as B
from experiments.launchers import local
from experiments.runs import folder as RF
from experiments.runs import locks
from experiments.runs import run as R
from experiments.runs.folder import RunInfo, read_info
from experiments.tables.sources import read_curve
from transformer_lit import config as C

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table3() -> G.Grid:
    return G.load_grid("table3")


# ----------------------------------------------------------------------------------------------------------
# Selection and parsing


def test_rows_by_name_and_by_group(table3):
    assert gridrun.select_rows(table3, "A1,B") == ["A1", "B1", "B2"]
    assert gridrun.select_rows(table3, "big, base,A1,A1") == ["big", "base", "A1"]
    assert gridrun.select_rows(table3, None) is None
    with pytest.raises(G.GridError, match="unknown row or group 'Z9'"):
        gridrun.select_rows(table3, "A1,Z9")


def test_seeds():
    assert gridrun.parse_seeds("3") == 3 and gridrun.parse_seeds("0,2") == [0, 2]
    for bad in ("0", "x", "1,a"):
        with pytest.raises(ValueError, match="--seeds"):
            gridrun.parse_seeds(bad)


def test_grid_run_accepts_options_between_file_and_overrides():
    args = cli.build_parser().parse_args(
        [
            "grid",
            "run",
            "table3",
            "train.max_steps=4",
            "--scale",
            "tiny",
            "model.d_k=4",
            "--rows",
            "A1",
            "--no-wandb",
        ]
    )
    assert args.func is cli.cmd_grid_run and args.file == "table3" and args.scale == "tiny"
    assert args.overrides == ["train.max_steps=4", "model.d_k=4"] and args.rows == "A1" and args.no_wandb
    assert args.devices == "all" and args.retries == 1 and args.launcher == "local"


def test_train_jobs_read_the_run_their_planner_wrote(table3, tmp_path):
    """The grid resolves each config once and writes it to the run folder; the child's argv names the
    folder and the launcher's run-time overrides only (issue 11, point 4)."""
    launcher = local.LocalLauncher(local.parse_devices("cpu:2"))
    specs = gridrun.specs_for(
        table3, "tiny", rows="base,big", seeds=2, overrides=["train.max_steps=7"], runs=tmp_path
    )
    jobs, skipped = gridrun.grid_jobs(specs, launcher)
    assert not skipped and [j.name for j in jobs] == [s.name for s in specs]
    big, base = jobs[2], jobs[0]
    assert big.cost > base.cost and base.slots == 1
    args = cli.build_parser().parse_args(base.argv[3:])  # what the child process will parse
    assert args.func is cli.cmd_train and Path(args.run_dir) == specs[0].run_dir
    assert (args.grid, args.row, args.scale, args.seed, args.out) == (None, None, None, None, None)
    assert args.overrides == ["train.accelerator=cpu", "train.num_threads=1", "train.progress_bar=false"]
    assert base.argv[:3] == [sys.executable, "-m", "experiments.cli"]
    for spec in specs:
        assert C.load_yaml(spec.run_dir / "config.yaml") == spec.config
        assert read_info(spec.run_dir) == RunInfo(grid="table3", scale="tiny", row=spec.row)
    cfg, info = R.planned(specs[2].run_dir, args.overrides)
    assert cfg == C.apply_overrides(specs[2].config, args.overrides) and cfg.model.num_heads == 16
    assert info.row == "big"


def test_a_folder_with_another_config_stops_the_grid_before_anything_is_written(table3, tmp_path):
    launcher = local.LocalLauncher(local.parse_devices("cpu:2"))
    specs = gridrun.specs_for(table3, "tiny", rows="base,A1", runs=tmp_path)
    specs[1].run_dir.mkdir(parents=True)
    C.dump_yaml(C.base(), specs[1].run_dir / "config.yaml")
    with pytest.raises(R.RunFolderConflict, match="holds a run with a different config"):
        gridrun.grid_jobs(specs, launcher)
    assert not specs[0].run_dir.exists()


def test_a_finished_run_answers_only_for_its_own_config(table3, tmp_path, capsys):
    """Issue 12: `--rows C1 model.dropout=0.3` printed "skipped ppl_dev=61.72", the dropout-0.1 result."""
    (spec,) = gridrun.specs_for(table3, "tiny", rows="C1", runs=tmp_path)
    R.plan(spec.run_dir, spec.config, RunInfo(grid="table3", scale="tiny", row="C1"))
    summary = {
        "grid": "table3",
        "scale": "tiny",
        "row": "C1",
        "seed": 0,
        "status": "complete",
        "ppl_dev": 61.72,
    }
    RF.write_summary(spec.run_dir, summary)
    before = sorted(p.name for p in spec.run_dir.iterdir())
    ask = ["grid", "run", "table3", "--scale", "tiny", "--rows", "C1", "--runs", str(tmp_path)]
    assert cli.main([*ask, "--devices", "cpu:1", "model.dropout=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "holds a run with a different config (model.dropout: 0.1 there, 0.3 now)" in err
    assert sorted(p.name for p in spec.run_dir.iterdir()) == before  # nothing written, nothing started
    assert json.loads((spec.run_dir / RF.SUMMARY).read_text()) == summary
    assert (
        cli.main([*ask, "--devices", "cpu:1", "train.num_threads=1"]) == 0
    )  # same run, run-time field aside
    assert "skipped" in capsys.readouterr().out


def test_slots_follow_train_devices(table3, tmp_path):
    launcher = local.LocalLauncher(local.parse_devices("cpu:2"))
    (spec,) = gridrun.specs_for(table3, "tiny", rows="base", overrides=["train.devices=2"], runs=tmp_path)
    assert gridrun.job_for_spec(spec, launcher).slots == 2


def test_costs_order_the_rows_sensibly(table3):
    cost = {r: B.estimate_seconds(table3.config(r, "tiny")) for r in ("base", "C1", "C3", "big")}
    assert cost["big"] > cost["C3"] > cost["base"] > cost["C1"] > B.RUN_OVERHEAD_S
    assert B.estimate_seconds(table3.config("base", "tiny"), "cuda") < cost["base"]


def test_lpt_makespan():
    assert gridrun.lpt_makespan([3, 3, 2, 2, 2], 2) == 7
    assert gridrun.lpt_makespan([5], 4) == 5
    assert gridrun.lpt_makespan([], 2) == 0


# ----------------------------------------------------------------------------------------------------------
# Status and plan on fixture folders


def _fixture_runs(table3, root: Path) -> list[G.RunSpec]:
    """base complete, A1 failed, A2 running (held by us), A3 interrupted, A4 pending."""
    specs = gridrun.specs_for(table3, "tiny", rows="base,A", runs=root)
    by_row = {s.row: s for s in specs}
    for s in specs:
        s.run_dir.mkdir(parents=True)
    (by_row["base"].run_dir / "summary.json").write_text(
        json.dumps({"status": "complete", "ppl_dev": 4.321, "bleu_dev": 25.5, "wall_seconds": 125.0})
    )
    (by_row["A1"].run_dir / "failed.json").write_text(
        json.dumps({"status": "failed", "error": "exited with status 1"})
    )
    (by_row["A1"].run_dir / "train.log").write_text("boom\n")
    (by_row["A3"].run_dir / "train.log").write_text("step 10\n")
    return specs


def test_status_lines_and_totals(table3, tmp_path):
    specs = _fixture_runs(table3, tmp_path)
    lock = locks.RunLock(specs[2].run_dir)  # A2
    assert lock.acquire()
    try:
        text = gridrun.format_status([gridrun.run_state(s) for s in specs])
    finally:
        lock.release()
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert "complete" in lines["table3/tiny/base/seed0"] and "4.32" in lines["table3/tiny/base/seed0"]
    assert "25.50" in lines["table3/tiny/base/seed0"] and "2m05s" in lines["table3/tiny/base/seed0"]
    assert (
        "failed" in lines["table3/tiny/A1/seed0"] and "exited with status 1" in lines["table3/tiny/A1/seed0"]
    )
    assert (
        "running" in lines["table3/tiny/A2/seed0"] and f"pid {os.getpid()}" in lines["table3/tiny/A2/seed0"]
    )
    assert lines["table3/tiny/A3/seed0"].split()[1] == "interrupted"
    assert lines["table3/tiny/A4/seed0"].split()[1] == "pending"
    assert text.splitlines()[-1] == "total 5: 1 complete, 1 running, 1 interrupted, 1 pending, 1 failed"


def test_status_command(table3, tmp_path, capsys):
    _fixture_runs(table3, tmp_path)
    assert (
        cli.main(["grid", "status", "table3", "--scale", "tiny", "--rows", "base,A", "--runs", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "total 5: 1 complete, 1 interrupted, 2 pending, 1 failed" in out


def test_plan_imports_no_torch_and_marks_done_runs(table3, tmp_path):
    _fixture_runs(table3, tmp_path)
    argv = ["grid", "plan", "table3", "--scale", "tiny", "--rows", "base,A1,big", "--runs", str(tmp_path)]
    code = (
        "import sys; from experiments import cli; "
        f"rc = cli.main({argv + ['--devices', 'cpu:2']!r}); "
        "assert 'torch' not in sys.modules, 'plan imported torch'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:-2]}
    assert (
        "complete (skipped)" in lines["table3/tiny/base/seed0"]
        and "764,416" in lines["table3/tiny/base/seed0"]
    )
    big_steps = G.load_grid("table3").config("big", "tiny").train.max_steps
    big = lines["table3/tiny/big/seed0"]
    assert "2,905,088" in big and f"{big_steps:,}" in big
    assert "failed" in lines["table3/tiny/A1/seed0"]
    assert out.stdout.splitlines()[-2].startswith("2 of 3 runs to do")
    assert "on cpu:2 (2 slot(s))" in out.stdout and "rough" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("checkpoints: 787.1 MB for the runs to do, 842.2 MB")


def test_help_and_status_import_neither_torch_nor_lightning(table3, tmp_path):
    """``tlit --help`` and ``tlit grid status`` stay fast: no torch, no Lightning in the process."""
    _fixture_runs(table3, tmp_path)
    status = ["grid", "status", "table3", "--scale", "tiny", "--rows", "base,A", "--runs", str(tmp_path)]
    code = (
        "import contextlib, io, sys; from experiments import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "assert 'grid' in help_text.getvalue()\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]\n"
        f"rc = cli.main({status!r})\n"
        "heavy += [m for m in ('torch', 'lightning') if m in sys.modules and m not in heavy]\n"
        "print('heavy:', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "total 5: 1 complete" in out.stdout and out.stdout.splitlines()[-1] == "heavy: []"


def test_bad_devices_and_rows_fail_in_one_line(capsys):
    assert cli.main(["grid", "plan", "table3", "--devices", "tpu:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlit grid: error: --devices 'tpu:1'") and "\n" not in err
    assert cli.main(["grid", "status", "table3", "--rows", "Q"]) == 2
    assert "unknown row or group 'Q'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Running (fake launcher) and the display


class _FakeLauncher(B.Launcher):
    def __init__(self, states: dict[str, B.JobState]):
        self.states, self.seen = states, []

    def run(self, jobs, on_update=None):
        self.seen = list(jobs)
        return [
            B.JobResult(j.name, j.run_dir, self.states.get(j.name, B.JobState.DONE), 1, 3.0) for j in jobs
        ]


def test_run_grid_skips_complete_runs_and_reports_failures(table3, tmp_path):
    specs = _fixture_runs(table3, tmp_path)
    fake = _FakeLauncher({"table3/tiny/A1/seed0": B.JobState.FAILED})
    out = io.StringIO()
    assert gridrun.run_grid(specs, fake, out, live=False) == 1
    assert [j.name for j in fake.seen] == [s.name for s in specs[1:]]  # base is complete
    text = out.getvalue()
    assert "1 of 5 runs already complete" in text
    assert any(
        line.startswith("table3/tiny/base/seed0") and "skipped" in line and "ppl_dev=4.32" in line
        for line in text.splitlines()
    )
    assert any(line.startswith("table3/tiny/A1/seed0") and "failed" in line for line in text.splitlines())
    assert gridrun.run_grid(specs, _FakeLauncher({}), io.StringIO(), live=False) == 0


def _progress(jobs, states, running, speed=1.0):
    return B.Progress(states, running, 0, 2, speed, {})


def test_eta_uses_costs_slots_and_observed_speed(tmp_path):
    jobs = {n: B.Job(n, [], tmp_path, cost=c) for n, c in [("a", 100), ("b", 50), ("c", 50), ("d", 10)]}
    p = _progress(
        jobs,
        {"a": B.JobState.RUNNING, "b": B.JobState.RUNNING, "c": B.JobState.PENDING, "d": B.JobState.DONE},
        {"a": 40.0, "b": 10.0},
    )
    assert gridrun.eta_seconds(jobs, p) == pytest.approx(75.0)  # (60 + 40 + 50) / 2 slots
    p.speed = 2.0
    assert gridrun.eta_seconds(jobs, p) == pytest.approx(175.0)  # (160 + 90 + 100) / 2


def test_eta_counts_every_seat_a_multi_gpu_job_holds(tmp_path):
    """2 GPUs x 4 jobs each = 8 seats; a 2-GPU job holds all 8 while it runs, a 1-GPU job one."""
    jobs = {"ddp": B.Job("ddp", [], tmp_path, cost=100, slots=2), "one": B.Job("one", [], tmp_path, cost=80)}
    pending = {"ddp": B.JobState.PENDING, "one": B.JobState.PENDING}
    p = B.Progress(pending, {}, 8, 8, 1.0, {}, seats_per_device=4)
    assert gridrun.eta_seconds(jobs, p) == pytest.approx(110.0)  # (100 x 8 + 80) / 8 seats
    p.seats_per_device = 1
    assert gridrun.eta_seconds(jobs, p) == pytest.approx(100.0)  # longest job: (100 x 2 + 80) / 8 < 100


def test_display_plain_and_live(tmp_path):
    jobs = [B.Job(n, [], tmp_path, cost=10) for n in ("x", "y")]
    out = io.StringIO()
    display = gridrun.GridDisplay(jobs, out, live=False)
    display.update(_progress(jobs, {"x": B.JobState.RUNNING, "y": B.JobState.PENDING}, {"x": 1.0}))
    display.update(_progress(jobs, {"x": B.JobState.DONE, "y": B.JobState.RUNNING}, {"y": 1.0}))
    assert out.getvalue().splitlines() == [
        "[  0/2] running     x",
        "[  1/2] done        x",
        "[  1/2] running     y",
    ]
    from rich.console import Console

    console = Console(record=True, width=150)
    console.print(
        display.render(_progress(jobs, {"x": B.JobState.DONE, "y": B.JobState.RUNNING}, {"y": 4.0}))
    )
    text = console.export_text()
    assert "1 done" in text and "1 running" in text and "0 failed" in text and "ETA ~6s" in text
    assert "running" in text and "y" in text


# ----------------------------------------------------------------------------------------------------------
# Real training (slow): two rows on 2 CPU slots; then SIGKILL of a real grid and resume

MICRO = [
    "train.max_steps=4",
    "data.synthetic_pairs=300",
    "data.synthetic_eval_pairs=20",
    "model.num_layers=1",
    "train.val_every_n_steps=2",
    "train.checkpoint_every_n_steps=2",
    "eval.max_sentences=20",
    "train.wandb=false",
]


def _tlit(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", *args]


@pytest.mark.slow
def test_real_grid_of_two_rows_on_two_cpu_slots(tmp_path):
    cmd = _tlit(
        "grid",
        "run",
        "ablations/table3.yaml",
        "--scale",
        "tiny",
        "--rows",
        "C1,C4",
        "--devices",
        "cpu:2",
        "--runs",
        str(tmp_path),
        *MICRO,
    )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("C1", "C4"):
        run_dir = tmp_path / "table3" / "tiny" / row / "seed0"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["train_steps"] == 4 and summary["row"] == row
        assert "cpu (1 threads)" in summary["device"]
        assert not (run_dir / "run.lock").exists()
        assert f"table3/tiny/{row}/seed0  done" in out.stdout
    ask = ("grid", "status", "table3", "--scale", "tiny", "--rows", "C1,C4", "--runs", str(tmp_path))
    status = subprocess.run(_tlit(*ask, *MICRO), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "total 2: 2 complete" in status.stdout
    other = subprocess.run(_tlit(*ask), cwd=ROOT, capture_output=True, text=True, timeout=60)  # no overrides
    assert "total 2: 2 conflict" in other.stdout and "(model.num_layers: 1 there, 2 now)" in other.stdout


@pytest.mark.slow
def test_real_two_slot_job_runs_lightning_ddp_on_cpu(tmp_path):
    """A run with train.devices=2 takes both CPU slots and trains as 2 DDP processes (gloo)."""
    cmd = _tlit(
        "grid",
        "run",
        "table3",
        "--scale",
        "tiny",
        "--rows",
        "C1",
        "--devices",
        "cpu:2",
        "--runs",
        str(tmp_path),
        *MICRO,
        "train.devices=2",
    )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "table3" / "tiny" / "C1" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["device"].endswith("x2")
    log = (run_dir / "train.log").read_text()
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log


@pytest.mark.slow
def test_real_grid_killed_then_resumed(tmp_path):
    """SIGKILL the grid while a run trains (after its first checkpoint), rerun: the finished run is kept,
    the interrupted run resumes from its checkpoint, the final set of summaries is complete."""
    micro = [o for o in MICRO if not o.startswith("train.max_steps")] + ["train.max_steps=60"]
    cmd = _tlit(
        "grid",
        "run",
        "table3",
        "--scale",
        "tiny",
        "--rows",
        "C1,C4",
        "--devices",
        "cpu:1",
        "--runs",
        str(tmp_path),
        *micro,
    )
    specs = gridrun.specs_for(G.load_grid("table3"), "tiny", rows="C1,C4", overrides=micro, runs=tmp_path)
    first, second = (s.run_dir for s in sorted(specs, key=lambda s: -B.estimate_seconds(s.config)))  # LPT
    grid = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # one slot: kill once the first run is done and the second has a checkpoint but no summary yet
    while not ((first / "summary.json").is_file() and (second / "checkpoints" / "last.ckpt").is_file()):
        assert time.time() < deadline and grid.poll() is None, "grid ended or stalled before the kill"
        time.sleep(0.1)
    os.kill(grid.pid, signal.SIGKILL)
    grid.wait()
    first_summary = (first / "summary.json").read_text()
    assert not (second / "summary.json").is_file(), "the second run finished before the kill"
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (first / "summary.json").read_text() == first_summary  # kept, not repeated
    assert "1 of 2 runs already complete" in out.stdout
    resumed = json.loads((second / "summary.json").read_text())
    assert resumed["status"] == "complete" and resumed["train_steps"] == 60
    log = (second / "train.log").read_text()
    assert "attempt 1/2" in log and "resuming" in log
    assert not (second / "run.lock").exists() and not (first / "run.lock").exists()
    # the resumed run's metrics.csv holds the whole run, each validation once (issue 12)
    curve, problem = read_curve(second / RF.METRICS)
    with (second / RF.METRICS).open(newline="") as fh:
        val_rows = [r for r in csv.DictReader(fh) if r["val/ppl"]]
    assert not problem and [s for s, _ in curve] == [*range(1, 60, 2), 60] and len(val_rows) == len(curve)


@pytest.mark.slow
def test_the_training_child_reads_its_folder_and_never_imports_the_grid_module(table3, tmp_path):
    """Plan a run as ``tlit grid run`` does, then run the child's exact argv: it trains from config.yaml and
    run.json, and ``experiments.grids.grid`` is never imported in that process."""
    micro = [*MICRO, "train.max_steps=2", f"data.cache_dir={tmp_path / 'cache'}"]
    specs = gridrun.specs_for(table3, "tiny", rows="C1", overrides=micro, runs=tmp_path / "runs")
    (job,), _ = gridrun.grid_jobs(specs, local.LocalLauncher(local.parse_devices("cpu:1")))
    code = (
        "import json, sys; from experiments import cli; "
        f"rc = cli.main({job.argv[3:]!r}); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('experiments.')))); sys.exit(rc)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    imported = json.loads(out.stdout.splitlines()[-1])
    assert "experiments.runs.trainer" in imported  # it did train here
    assert not [m for m in imported if m.startswith("experiments.grids")], imported
    summary = json.loads((specs[0].run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["train_steps"] == 2
    assert (summary["grid"], summary["scale"], summary["row"]) == ("table3", "tiny", "C1")
