"""Sweeps on a real PostgreSQL server, started by these tests (``pgserver``: PostgreSQL 16 from a wheel, no
system package, also as root). Workers on a database are how several nodes share one study.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pgserver
import pytest

from experiments import cli
from experiments.sweeps import file as sweep_file
from experiments.sweeps import runner as sweeps
from experiments.sweeps import storage as sweep_storage
from tests.test_sweep import (
    assert_no_trial_lost_or_repeated,
    kill_a_worker_mid_trial,
    start_worker,
    study_of,
    sweep_cli,
    write_sweep,
)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One private server for the session; every test uses its own study names in its database."""
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def test_storage_url_gets_an_installed_driver_and_connects(postgres_url: str):
    storage = sweep_storage.parse_storage(postgres_url)
    assert storage.kind == "postgresql" and storage.url.startswith(
        ("postgresql+psycopg2://", "postgresql+psycopg://")
    )
    sweep_storage.check_storage(storage)
    with sweep_storage.budget_lock(storage, "x"):  # an advisory lock: held and released
        pass


def test_unreachable_server_is_one_line_before_any_trial(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    url = "postgresql://postgres:hunter2@/postgres?host=/nonexistent-socket-dir"
    assert cli.main(["sweep", str(write_sweep(tmp_path)), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and err.count("\n") == 0 and "hunter2" not in err, err
    assert time.monotonic() - start < 15
    assert not (tmp_path / "results" / "runs").exists()


def test_workers_starting_together_share_a_postgres_study(tmp_path: Path, postgres_url: str):
    """Three worker processes create the (fresh) study at once and share its budget exactly."""
    path = write_sweep(tmp_path, "pg_together", trials=10)
    workers = [start_worker(tmp_path, path, i, postgres_url, standin=0.2) for i in range(3)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    study = study_of(sweep_file.load_sweep(path), postgres_url)
    assert_no_trial_lost_or_repeated(study, tmp_path, 10)


def test_cli_workers_on_postgres(tmp_path: Path, postgres_url: str):
    path = write_sweep(tmp_path, "pg_cli", trials=8)
    done = sweep_cli(
        tmp_path, str(path), "--workers", "2", "--devices", "cpu:2", "--storage", postgres_url, standin=0.2
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8/8 finished" in done.stdout
    assert not (tmp_path / "results" / "sweeps" / "pg_cli" / "journal.log").exists()
    assert_no_trial_lost_or_repeated(study_of(sweep_file.load_sweep(path), postgres_url), tmp_path, 8)


def test_killed_worker_trial_is_failed_and_retried_postgres(tmp_path: Path, postgres_url: str):
    path = write_sweep(tmp_path, "pg_kill", trials=3, pruner="none", pruner_options={})
    kill_a_worker_mid_trial(tmp_path, path, postgres_url, trials=3)


def test_real_micro_sweep_on_postgres(tmp_path: Path, postgres_url: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(sweeps.STANDIN_ENV, raising=False)
    spec = sweep_file.load_sweep(
        write_sweep(tmp_path, "pg_micro", trials=3), overrides={"train.max_steps": 15}
    )
    assert sweeps.run_sweep(spec, postgres_url) == 0
    study = study_of(spec, postgres_url)
    states = [t.state for t in study.trials]
    assert len(states) == 3 and all(
        s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states
    )
    for t in study.trials:
        folder = Path(t.user_attrs["run_dir"])
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert json.loads((folder / "summary.json").read_text())["ppl_dev"] == pytest.approx(t.value)
        else:
            assert json.loads((folder / sweeps.PRUNED).read_text())["train_steps"] < 15
        assert sorted(t.intermediate_values) == [5, 10, 15][: len(t.intermediate_values)]
