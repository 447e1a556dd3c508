"""Sweeps end as their trials say (issue 12, "Sweeps"): every value is checked before the storage is
touched, the report counts against the trials asked for, a rerun with nothing left starts no worker, a dead
worker is replaced, the sweep exits 0 once every trial finished, and a trial whose worker died is shown as
waiting out its heartbeat grace, not just "running". Trials are the test-only stand-in
(``TLIT_SWEEP_STANDIN``), as in tests/test_sweep.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna

from experiments import cli
from experiments.sweeps import file as sweep_file
from experiments.sweeps import runner as sweeps
from experiments.sweeps import storage as sweep_storage
from tests.test_sweep import ROOT, study_of, sweep_cli, write_sweep


def test_workers_0_is_refused_before_the_study_exists(tmp_path: Path, capsys, monkeypatch):
    """The probe: ``--workers 0`` created the study, then refused; the next valid command (another base)
    failed with "made with a different base"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    path = write_sweep(tmp_path, trials=2)
    for args, message in [
        (["--workers", "0"], "--workers must be a positive integer, got 0"),
        (
            ["--workers", "3", "--devices", "cpu:2"],
            "--workers 3 needs 3 device slots; --devices cpu:2 gives 2",
        ),
    ]:
        assert cli.main(["sweep", str(path), *args, "model.dropout=0.2"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
        assert not (tmp_path / "results").exists()  # no journal, no study, no run folder
    assert cli.main(["sweep", str(path), "model.dropout=0.3"]) == 0


def test_report_counts_against_the_trials_asked_for(tmp_path: Path, capsys, monkeypatch):
    """The probe: after ``--trials 2`` (the file says 6) the report said "2/6 finished"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    path = write_sweep(tmp_path, trials=6, pruner="none", pruner_options={})
    assert cli.main(["sweep", str(path), "--trials", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 2/2 finished" in out, out
    assert cli.main(["sweep", str(path), "--report", "--trials", "6"]) == 0  # asked for: counted against
    assert "Trials: 2/6 finished" in capsys.readouterr().out


def test_a_rerun_with_nothing_left_starts_no_worker(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    path = write_sweep(tmp_path, trials=2, pruner="none", pruner_options={})
    assert sweeps.run_sweep(sweep_file.load_sweep(path), None) == 0
    again = sweep_cli(tmp_path, str(path), "--workers", "2", "--devices", "cpu:2", standin=0.01)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2/2 finished" in again.stdout and "nothing left to do" in again.stdout, again.stdout
    assert not (tmp_path / "results" / "sweeps" / "micro" / "workers").exists()  # no worker was started


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_killed_worker_is_replaced_and_the_sweep_exits_0(tmp_path: Path):
    """The probe: a SIGKILLed worker was not replaced, and the sweep exited 1 although every trial finished
    (the survivor retried the killed one's trial)."""
    path = write_sweep(tmp_path, trials=6, pruner="none", pruner_options={})
    env = {**os.environ, "PYTHONPATH": str(ROOT), sweeps.STANDIN_ENV: "1.0"}
    argv = [
        sys.executable,
        "-m",
        "experiments.cli",
        "sweep",
        str(path),
        "--workers",
        "2",
        "--devices",
        "cpu:2",
    ]
    sweep = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        victim = None
        while time.monotonic() < deadline and victim is None:  # a worker inside a trial
            workers = _children(sweep.pid)
            for log in (tmp_path / "results" / "runs").rglob("standin.log"):
                pids = {int(line.split()[1]) for line in log.read_text().splitlines()}
                victim = next(iter(pids & set(workers)), None) or victim
            time.sleep(0.1)
        assert victim is not None, "no worker started a trial"
        os.kill(victim, signal.SIGKILL)
        out, _ = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out
    assert "killed by signal SIGKILL; started again (1/2)" in out, out
    assert "6/6 finished" in out and "every trial finished all the same" not in out, out
    study = study_of(sweep_file.load_sweep(path), str(tmp_path / "results/sweeps/micro/journal.log"))
    assert (
        sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials) == 1
    )  # the killed trial, retried


def test_a_dead_workers_trial_says_it_waits_for_the_heartbeat_grace(tmp_path: Path):
    """The probe: "2 running" while both trials' workers were dead, with no word of why nothing moved."""
    spec = sweep_file.load_sweep(write_sweep(tmp_path, heartbeat={"interval": 1, "grace": 30}))
    url = str(tmp_path / "journal.log")
    storage = sweep_storage.parse_storage(url)
    study = sweeps.open_study(spec, storage)
    alive, dead = study.ask(), study.ask()
    backend = study._storage
    backend.set_trial_system_attr(alive._trial_id, sweep_storage.HEARTBEAT_ATTR, time.time())
    backend.set_trial_system_attr(dead._trial_id, sweep_storage.HEARTBEAT_ATTR, time.time() - 10)
    line = sweeps.progress_line(spec, study)
    assert (
        "2 running (1 of them silent: waiting 20 s more for a stale worker's heartbeat (grace 30 s)" in line
    ), line
    backend.set_trial_system_attr(dead._trial_id, sweep_storage.HEARTBEAT_ATTR, time.time())
    assert "silent" not in sweeps.progress_line(spec, study)


def test_database_heartbeats_are_read_too(tmp_path: Path):
    """RDB storages (SQLite, PostgreSQL) keep heartbeats in their own table, read against their own clock."""
    spec = sweep_file.load_sweep(write_sweep(tmp_path, heartbeat={"interval": 1, "grace": 30}))
    db = tmp_path / "study.db"
    study = sweeps.open_study(spec, sweep_storage.parse_storage(f"sqlite:///{db}"))
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-12 seconds')")
    ages = sweep_storage.heartbeat_ages(study)
    assert list(ages) == [trial.number] and 11 < ages[trial.number] < 20, ages
    assert "1 of them silent: waiting 18 s more" in sweeps.progress_line(spec, study)
