"""Sweeps: files load and are checked, trials are run folders, workers share a study without losing or
repeating a trial, a killed worker's trial is retried, pruning stops a trial early, report and export work.

Where the point is storage and workers, trials are the test-only stand-in (``TLIT_SWEEP_STANDIN=SECONDS``:
no training, same folders, reports and pruning; see experiments/sweep.py). The real micro-training tests
train a one-layer d_model=32 model for 20 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from experiments import cli
from experiments.grids import grid as G
from experiments.sweeps import file as sweep_file
from experiments.sweeps import report as sweep_report
from experiments.sweeps import runner as sweeps
from experiments.sweeps import space as sweep_space
from experiments.sweeps import storage as sweep_storage
from experiments.sweeps import trials as sweep_trials
from transformer_lit import config as C

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "ablations" / "sweeps").glob("*.yaml"))
MICRO = {
    "model.num_layers": 1,
    "model.d_model": 32,
    "data.synthetic_pairs": 400,
    "data.synthetic_eval_pairs": 50,
    "data.vocab_size": 200,
    "train.max_steps": 20,
    "train.val_every_n_steps": 5,
    "eval.max_sentences": 10,
    "train.wandb": False,
    "train.progress_bar": False,
    "train.num_threads": 1,
}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_sweep(folder: Path, name: str = "micro", **changes) -> Path:
    """A small sweep file: two knobs (h, and d_k at paper size), micro fixed settings, fast heartbeats."""
    doc = {
        "study": name,
        "scale": "tiny",
        "sampler": "tpe",
        "sampler_options": {"seed": 0, "n_startup_trials": 3},
        "pruner": "median",
        "pruner_options": {"n_startup_trials": 2},
        "trials": 6,
        "params": {
            "model.num_heads": {"choices": [1, 2, 4]},
            "model.d_k": {"low": 16, "high": 64, "log": True},
        },
        "fixed": dict(MICRO),
        "heartbeat": {"interval": 1, "grace": 3},
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(f"# tlit sweep {path}\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_cli(
    folder: Path, *args: str, standin: float | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(sweeps.STANDIN_ENV, None)
    if standin is not None:
        env[sweeps.STANDIN_ENV] = str(standin)
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", "sweep", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def study_of(spec: sweep_space.SweepSpec, url: str) -> optuna.Study:
    storage = sweep_storage.open_storage(
        sweep_storage.parse_storage(url), heartbeat_interval=1, grace_period=3, retries=2
    )
    return optuna.load_study(study_name=spec.study, storage=storage)


def assert_no_trial_lost_or_repeated(study: optuna.Study, cwd: Path, wanted: int) -> None:
    """Exactly ``wanted`` finished trials, none running; each ran once (the stand-in's ledger) unless it is
    a retry; complete ones have a summary.json, pruned ones a pruned.json (``cwd``: where the sweep ran)."""
    trials = study.get_trials()
    finished = [
        t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == wanted, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in finished:
        folder = Path(t.user_attrs["run_dir"])
        folder = folder if folder.is_absolute() else cwd / folder
        attempts = (folder / "standin.log").read_text().splitlines()
        retried = t.system_attrs.get("failed_trial") is not None
        assert len(attempts) == 1 or retried, (t.number, attempts)
        marker = "summary.json" if t.state == optuna.trial.TrialState.COMPLETE else sweeps.PRUNED
        assert (folder / marker).is_file(), (t.number, marker)


# ----------------------------------------------------------------------------------------------------------
# Files and checks


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_loads(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# tlit sweep ablations/sweeps/") and path.name in first, first
    spec = sweep_file.load_sweep(path)
    assert spec.study == path.stem and spec.budget >= 1
    spec.base_config()
    sweep_space.make_sampler(spec, seed=1)
    study = optuna.create_study(directions=spec.directions, sampler=sweep_space.make_sampler(spec))
    trial = study.ask()
    spec.config(spec.trial_values(trial))  # a sampled point is a valid config


def test_shipped_sweeps_cover_the_issue():
    assert len(SWEEPS) >= 2
    heads = sweep_file.load_sweep("heads_dk")
    assert heads.params["model.num_heads"].choices == (1, 2, 4, 8, 16)
    assert {"model.dropout", "optim.label_smoothing", "model.positional"} <= set(heads.params)
    assert sweep_file.load_sweep("heads_fixed_compute").constraint == "fixed_compute"
    assert sweep_file.load_sweep("regularisation").directions == ["minimize", "maximize"]


def test_params_are_given_at_paper_size_and_scaled_like_grid_rows():
    d_k = {
        s: sweep_file.load_sweep("heads_dk", scale=s).params["model.d_k"] for s in ("paper", "small", "tiny")
    }
    assert [(p.low, p.high, p.log) for p in d_k.values()] == [(8, 128, True), (4, 64, True), (1, 16, True)]
    spec = sweep_file.load_sweep("heads_dk")
    assert spec.to_paper("model.d_k", 3) == 24 and spec.to_paper("model.dropout", 0.2) == 0.2
    assert spec.base_config().model.d_model == 64  # tiny base, as in the grid
    assert spec.base_config().train.max_steps == 700  # the scale's steps, as the grid's base row
    assert spec.base_config().eval.max_sentences == 100  # fixed values are literal


def test_fixed_compute_derives_d_k_and_d_v_from_h():
    spec = sweep_file.load_sweep("heads_fixed_compute")
    assert spec.budget == 12  # grid sampler: 6 h x 2 positional, capped
    values = {"model.num_heads": 16, "model.positional": "learned"}
    cfg = spec.config({**values, **spec.derived(values, spec.base_config())})
    assert (cfg.model.num_heads, cfg.model.d_k, cfg.model.d_v) == (16, 4, 4)
    assert cfg.model.num_heads * cfg.model.d_k == cfg.model.d_model


BAD = [
    ({"params": {"model.heads": {"choices": [1, 2]}}}, "unknown config field 'model.heads'"),
    ({"params": {"model.num_heads": {"choices": []}}}, "choices must be a non-empty list"),
    ({"params": {"model.dropout": {"low": 0.3, "high": 0.1}}}, "empty range: low 0.3 > high 0.1"),
    ({"params": {"optim.lr_factor": {"low": 0.0, "high": 2.0, "log": True}}}, "log scale needs positive"),
    ({"params": {"model.d_k": {"low": 1, "high": 4}}}, "empty at scale tiny"),
    ({"params": {"model.dropout": {"low": 0.0, "high": 1.5}}}, "model.dropout must be in [0, 1)"),
    (
        {"params": {"model.positional": {"choices": ["sinusoidal", "rotary"]}}},
        "model.positional must be one of",
    ),
    ({"sampler": "cmaes"}, "unknown sampler 'cmaes'; allowed: tpe, random, grid"),
    ({"pruner": "hyperband"}, "unknown pruner 'hyperband'; allowed: median, successive_halving, none"),
    ({"pruner_options": {"n_startup": 2}}, "pruner_options for median"),
    ({"objective": "bleu"}, "unknown objective 'bleu'"),
    ({"objective": ["ppl_dev", "bleu_dev"]}, "pruning needs a single objective"),
    ({"constraint": "fixed_compute"}, "model.d_k is derived from h"),
    (
        {"sampler": "grid", "params": {"model.dropout": {"low": 0.0, "high": 0.3}}},
        "grid sampler needs choices",
    ),
    ({"trials": 0}, "trials must be a positive integer"),
    ({"fixed": {"train.max_step": 5}}, "unknown config field 'train.max_step'"),
    ({"seeds": 3}, "unknown key 'seeds'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(";")[0][:40] for _, m in BAD])
def test_bad_sweep_files_fail_in_one_line_naming_the_file(tmp_path: Path, change: dict, message: str):
    path = write_sweep(tmp_path, **change)
    with pytest.raises(sweep_space.SweepError) as err:
        sweep_file.load_sweep(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text, text


def test_cli_prints_bad_input_in_one_line_before_any_trial(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, sampler="cmaes")
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown sampler 'cmaes'" in err and "Traceback" not in err
    for storage, message in [
        ("postgresql://nobody:secret@127.0.0.1:1/nothing", "cannot connect"),
        ("mysql://u@host/db", "unknown scheme 'mysql'"),
        ("sqlite:///:memory:", "in-memory SQLite"),
    ]:
        assert cli.main(["sweep", str(write_sweep(tmp_path)), "--storage", storage]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and "secret" not in err, err
    wmt14 = {**MICRO, "data.corpus": "wmt14", "data.train": [str(tmp_path / "no-wmt14")]}
    assert cli.main(["sweep", str(write_sweep(tmp_path, name="nodata", fixed=wmt14))]) == 2
    err = capsys.readouterr().err.strip()  # missing data: how to get it, before any trial
    assert err.count("\n") == 0 and "tlit data wmt14 --out" in err and "Traceback" not in err, err
    assert not (tmp_path / "results" / "runs").exists()  # nothing started


# ----------------------------------------------------------------------------------------------------------
# One process: budget, continuation, refusal of another file


def test_study_reaches_its_count_and_a_rerun_continues_it(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    path = write_sweep(tmp_path)
    assert sweeps.run_sweep(sweep_file.load_sweep(path, trials=4), None) == 0
    spec = sweep_file.load_sweep(path, trials=7)
    assert sweeps.run_sweep(spec, None) == 0  # same command, more trials: continues the study
    url = sweep_storage.default_storage("results/sweeps", spec.study)
    study = study_of(spec, url)
    assert [t.number for t in study.trials] == list(range(7))
    assert_no_trial_lost_or_repeated(study, tmp_path, 7)
    key = study.user_attrs[sweeps.STUDY_KEY_ATTR]
    folder = tmp_path / f"results/runs/micro/tiny/study-{key}/trial0003/seed0"
    assert (folder / "config.yaml").is_file()
    assert sweeps.run_sweep(spec, None) == 0 and len(study_of(spec, url).trials) == 7  # nothing left to do
    with pytest.raises(sweep_space.SweepError, match="different scale"):
        sweeps.run_sweep(sweep_file.load_sweep(path, scale="small"), None)  # same study name, another space


def test_two_studies_of_one_name_never_share_a_trial_folder(tmp_path: Path, monkeypatch):
    """Issue 12: a new study (another journal) of the same name on the same --runs recorded, for its trial 0,
    the result of the first study's trial 0 (other parameters). Each study now has its own folders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    first = sweep_file.load_sweep(write_sweep(tmp_path, trials=2, pruner="none", pruner_options={}))
    (tmp_path / "other").mkdir()
    other = write_sweep(
        tmp_path / "other", trials=2, pruner="none", pruner_options={}, sampler_options={"seed": 7}
    )
    second = sweep_file.load_sweep(other)
    journals = [str(tmp_path / "a" / "journal.log"), str(tmp_path / "b" / "journal.log")]
    assert sweeps.run_sweep(first, journals[0]) == 0
    assert sweeps.run_sweep(second, journals[1]) == 0
    a, b = (study_of(spec, url).trials for spec, url in zip((first, second), journals, strict=True))
    assert a[0].params != b[0].params
    folders_a = {Path(t.user_attrs["run_dir"]).resolve() for t in a}
    folders_b = {Path(t.user_attrs["run_dir"]).resolve() for t in b}
    assert len(folders_a) == len(folders_b) == 2 and not folders_a & folders_b
    for t in b:  # each value is the second study's own trial's, trained in its own folder
        assert t.value == pytest.approx(sweep_trials.standin_score(second, t.params))
        assert (
            C.load_yaml(Path(t.user_attrs["run_dir"]) / "config.yaml").model.num_heads
            == t.params["model.num_heads"]
        )


def test_grid_sampler_visits_each_point_once(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    params = {
        "model.num_heads": {"choices": [1, 2, 4]},
        "model.positional": {"choices": ["sinusoidal", "learned"]},
    }
    path = write_sweep(
        tmp_path,
        sampler="grid",
        sampler_options={},
        pruner="none",
        pruner_options={},
        constraint="fixed_compute",
        params=params,
        trials=50,
    )
    spec = sweep_file.load_sweep(path)
    assert spec.budget == 6
    assert sweeps.run_sweep(spec, None) == 0
    study = study_of(spec, sweep_storage.default_storage("results/sweeps", spec.study))
    points = sorted((t.params["model.num_heads"], t.params["model.positional"]) for t in study.trials)
    assert points == sorted((h, p) for h in (1, 2, 4) for p in ("sinusoidal", "learned"))


# ----------------------------------------------------------------------------------------------------------
# Several processes on one journal file


def test_two_worker_processes_share_a_journal_study(tmp_path: Path):
    path = write_sweep(tmp_path, trials=12)
    done = sweep_cli(tmp_path, str(path), "--workers", "2", "--devices", "cpu:2", standin=0.2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12/12 finished" in done.stdout
    spec = sweep_file.load_sweep(path)
    study = study_of(spec, str(tmp_path / sweep_storage.default_storage("results/sweeps", spec.study)))
    assert_no_trial_lost_or_repeated(study, tmp_path, 12)
    pids = {
        line.split()[1]
        for f in (tmp_path / "results/runs").rglob("standin.log")
        for line in f.read_text().splitlines()
    }
    assert len(pids) == 2  # both workers ran trials
    logs = sorted(p.name for p in (tmp_path / "results/sweeps/micro/workers").iterdir())
    assert logs == ["worker0.log", "worker1.log"]


def test_workers_starting_together_share_a_fresh_sqlite_study(tmp_path: Path):
    """Two processes creating one fresh SQLite study at once collide in Optuna's schema set-up (docs/DESIGN.md
    field notes); the schema lock serialises them."""
    path = write_sweep(tmp_path, trials=6)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    workers = [start_worker(tmp_path, path, i, url, standin=0.1) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    assert_no_trial_lost_or_repeated(study_of(sweep_file.load_sweep(path), url), tmp_path, 6)


def test_exported_fixed_compute_row_is_at_paper_size():
    spec = sweep_file.load_sweep("heads_fixed_compute")
    trial = optuna.trial.create_trial(
        params={"model.num_heads": 4, "model.positional": "learned"},
        distributions={name: p.distribution() for name, p in spec.params.items()},
        value=5.0,
    )
    cells = sweep_report.best_cells(
        spec, trial
    )  # tiny: h=4 -> d_k = d_v = 64 / 4 = 16, i.e. 128 at the paper's size
    assert cells == {"model.num_heads": 4, "model.positional": "learned", "model.d_k": 128, "model.d_v": 128}


def start_worker(folder: Path, path: Path, index: int, storage: str, standin: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), sweeps.STANDIN_ENV: str(standin)}
    argv = [
        sys.executable,
        "-m",
        "experiments.cli",
        "sweep",
        str(path),
        "--worker",
        str(index),
        "--storage",
        storage,
    ]
    return subprocess.Popen(
        argv, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def kill_a_worker_mid_trial(folder: Path, path: Path, storage: str, trials: int) -> None:
    """Two workers; SIGKILL the first in the middle of a trial; the other must finish the study, retrying
    the killed trial (same parameters, same run folder) once its heartbeat is stale."""
    spec = sweep_file.load_sweep(path)
    victim = start_worker(folder, path, 0, storage, standin=2.0)
    ledgers = folder / "results" / "runs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the victim is inside a trial
        running = [f for f in ledgers.rglob("standin.log") if str(victim.pid) in f.read_text()]
        if running:
            break
        time.sleep(0.1)
    assert running, victim.stderr.read() if victim.poll() is not None else "victim never started a trial"
    survivor = start_worker(folder, path, 1, storage, standin=0.5)
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_in = [
        f.parent for f in running if not any((f.parent / m).exists() for m in ("summary.json", sweeps.PRUNED))
    ]
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    study = study_of(spec, storage if "://" in storage else str(folder / storage))
    states = {t.number: t.state for t in study.trials}
    failed = [n for n, s in states.items() if s == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1, states  # the killed trial, failed by the survivor's heartbeat check
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0]]
    assert len(retry) == 1 and retry[0].state.is_finished() and retry[0].state != optuna.trial.TrialState.FAIL
    killed = study.trials[failed[0]]
    assert retry[0].params == killed.params
    assert [(folder / retry[0].user_attrs["run_dir"]).resolve()] == [
        d.resolve() for d in killed_in
    ]  # resumed
    assert_no_trial_lost_or_repeated(study, folder, trials)


def test_killed_worker_trial_is_failed_and_retried_journal(tmp_path: Path):
    path = write_sweep(tmp_path, trials=3, pruner="none", pruner_options={})
    kill_a_worker_mid_trial(tmp_path, path, "results/sweeps/micro/journal.log", trials=3)


# ----------------------------------------------------------------------------------------------------------
# Real training: pruning and a micro sweep


def test_pruned_trial_stops_early_and_its_run_folder_says_so(tmp_path: Path):
    spec = sweep_file.load_sweep(write_sweep(tmp_path))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0, n_warmup_steps=10))
    trial = study.ask()
    objective = sweeps.make_objective(spec, tmp_path / "runs", [f"data.cache_dir={tmp_path / 'cache'}"])
    assert sweeps.run_trial(study, trial, objective) == optuna.trial.TrialState.PRUNED
    folder = Path(study.trials[0].user_attrs["run_dir"])
    pruned = json.loads((folder / sweeps.PRUNED).read_text())
    assert pruned["status"] == "pruned" and pruned["train_steps"] == 10 < pruned["max_steps"] == 20
    assert not (folder / "summary.json").exists()  # summary.json means complete; tables skip this run
    assert sorted(study.trials[0].intermediate_values) == [5, 10]  # optimizer steps, not epochs
    with (folder / "metrics.csv").open() as f:
        steps = [int(line.split(",")[1]) for line in f.readlines()[1:] if line.strip()]
    assert max(steps) < 20


def test_real_micro_sweep_then_report_and_export(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(sweeps.STANDIN_ENV, raising=False)
    spec = sweep_file.load_sweep(write_sweep(tmp_path, trials=3, pruner="none", pruner_options={}))
    assert sweeps.run_sweep(spec, None) == 0
    study = sweep_report.load_study(spec, None, "results/sweeps")
    for t in study.trials:
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["grid"] == "micro" and summary["train_steps"] == 20
        assert summary["ppl_dev"] == pytest.approx(t.value)
    report = sweep_report.make_report(spec, study, "results/sweeps")
    assert "## Best trials" in report.markdown
    names = {p.name for p in report.files}
    assert {"report.md", "history.png", "history.html", "parallel.png"} <= names
    best = sweep_report.export_best(spec, study, "results/sweeps")
    grid = G.load_grid(best)
    trial = study.best_trial
    assert grid.row("best").cells["model.d_k"] == trial.params["model.d_k"] * 8  # at paper size
    assert grid.config("best", "tiny").model.d_k == trial.params["model.d_k"]
    assert best.read_text().startswith(f"# tlit grid run {best} --scale tiny")


def test_report_and_export_of_a_two_objective_study(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sweeps.STANDIN_ENV, "0.01")
    params = {"model.dropout": {"low": 0.0, "high": 0.3}, "optim.label_smoothing": {"low": 0.0, "high": 0.2}}
    path = write_sweep(
        tmp_path, objective=["ppl_dev", "bleu_dev"], pruner="none", pruner_options={}, params=params, trials=6
    )
    assert cli.main(["sweep", str(path)]) == 0
    assert cli.main(["sweep", str(path), "--report", "--export-best"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "wrote results/sweeps/micro/best.yaml" in out
    files = {p.name for p in (tmp_path / "results/sweeps/micro").iterdir()}
    assert {"report.md", "pareto.png", "pareto.html", "history.png"} <= files
    grid = G.load_grid(tmp_path / "results/sweeps/micro/best.yaml")
    assert set(grid.rows) == {"base", "best"} and "model.dropout" in grid.row("best").cells


def test_a_pruned_trial_closes_its_wandb_run_so_the_next_trial_gets_its_own(monkeypatch):
    """Lightning leaves the W&B run of an interrupted fit open, and the next trial's WandbLogger would reuse
    it; ``close_wandb`` finishes it with the trial's status."""
    from types import SimpleNamespace

    from experiments.sweeps.pruning import close_wandb

    finished = []
    fake = SimpleNamespace(
        run=SimpleNamespace(summary={}), finish=lambda exit_code: finished.append(exit_code)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = fake.run
    close_wandb("pruned")
    assert run.summary == {"status": "pruned"} and finished == [0]
    fake.run = None
    close_wandb("failed")  # no open run: nothing to do
    assert finished == [0]
