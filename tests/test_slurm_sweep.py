"""``tlit sweep --launcher slurm`` on the real one-node cluster: the workers are one job array sharing the
study's journal; a worker that stops answering mid-trial and is then cancelled loses nothing and repeats
nothing (the heartbeat rule retries its trial once).

Trials are the test-only stand-in (``TLIT_SWEEP_STANDIN``: same folders and study, no training): the point
is SLURM and the workers; test_sweep.py trains real micro trials."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest

from experiments.sweeps import file as sweep_file
from experiments.sweeps import runner as sweeps
from tests.slurm_cluster import cancel_all, our_jobs, tlit, tlit_background, wait_for
from tests.test_sweep import assert_no_trial_lost_or_repeated, study_of, write_sweep

pytestmark = pytest.mark.slurm
TRIALS = 6


def sweep_tasks(name: str, newer_than: set[str]) -> dict[str, str]:
    """``{task id: state}`` of the SLURM tasks named ``name`` not in the arrays ``newer_than`` (slurmctld
    keeps finished jobs for a while: earlier tests' arrays may have the same name)."""
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-r", "-n", name, "-o", "%i|%T"], capture_output=True, text=True
    ).stdout
    tasks = dict(line.split("|", 1) for line in out.split())
    return {t: state for t, state in tasks.items() if t.split("_")[0] not in newer_than}


def failed_trials(spec, journal: Path) -> list:
    study = study_of(spec, str(journal))
    return study.get_trials(states=(optuna.trial.TrialState.FAIL,))


def test_workers_as_one_array_finish_the_study_despite_a_killed_worker(slurm_cluster: Path, tmp_path: Path):
    path = write_sweep(tmp_path, trials=TRIALS, pruner="none", pruner_options={})
    spec = sweep_file.load_sweep(path)
    journal = tmp_path / "results" / "sweeps" / spec.study / "journal.log"
    env = {sweeps.STANDIN_ENV: "3"}
    name = f"tlit-sweep-{spec.study}"
    before = our_jobs()
    sweep = tlit_background(
        "sweep", str(path), "--launcher", "slurm", "--workers", "2", cwd=tmp_path, env=env
    )
    try:
        tasks = wait_for(
            lambda: (t := sweep_tasks(name, before)) and len(t) == 2 and t, 60, "two worker tasks"
        )
        assert len({t.split("_")[0] for t in tasks}) == 1, tasks  # one job array

        def both_in_a_trial() -> bool:
            if not journal.is_file():
                return False
            running = study_of(spec, str(journal)).get_trials(states=(optuna.trial.TrialState.RUNNING,))
            return len(running) == 2

        wait_for(both_in_a_trial, 180, "both workers inside a trial", every=0.3)
        # worker 0 stops answering mid-trial (SIGSTOP: a frozen or cut-off node): its heartbeat goes stale and
        # the other worker fails and retries its trial; then it is cancelled (SIGCONT, SIGTERM): it must not
        # hand the trial back a second time
        victim = min(tasks)
        subprocess.run(["scancel", "--signal=STOP", victim], check=True)
        wait_for(lambda: failed_trials(spec, journal), 60, "the heartbeat rule to fail the frozen trial")
        subprocess.run(["scancel", victim], check=True)
        out, _ = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        cancel_all(sweep_tasks(name, before))
    assert f"{TRIALS}/{TRIALS} finished ({TRIALS} complete, 0 pruned)" in out, out
    # SLURM reports the killed task CANCELLED: reported, not a failure of the sweep, whose study is complete
    assert f"worker task {victim} ended CANCELLED; its trial is retried by the heartbeat rule" in out, out
    log = (journal.parent / "workers" / "worker0.log").read_text()
    assert "was already failed and queued again by another worker" in log, log
    assert sweep.returncode == 0, out
    study = study_of(spec, str(journal))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state) for t in study.trials]  # the frozen worker's trial
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    trials = [(t.number, t.state.name, t.system_attrs) for t in study.trials]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE, trials
    assert retry[0].params == failed[0].params
    assert_no_trial_lost_or_repeated(study, tmp_path, TRIALS)
    report = tlit("sweep", str(path), "--report", cwd=tmp_path, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (
        f"Trials: {TRIALS}/{TRIALS} finished ({TRIALS} complete, 0 pruned), 1 failed, 0 running"
        in report.stdout
    )
