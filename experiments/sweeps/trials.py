"""A sweep trial: its config and run folder, then training with pruning, or the test-only stand-in.

A trial trains ``experiments.runs.run.train`` into the run folder
``results/runs/<study>/<scale>/study-<key>/trial<NNNN>/seed<k>`` (the run-folder contract with ``grid`` =
study name, W&B group ``<study>/<scale>``), reporting its monitor (dev PPL) at every validation to the
pruner. ``<key>`` is drawn when the study is created and kept in its storage, so two studies of the same
name (a new journal, another ``--storage``) never share a folder. A pruned trial stops there and its folder
says so (``folder.PRUNED``; state "pruned", not complete). A failed trial's folder records its error
(``folder.FAILED``). The retry of a killed trial (same parameters) resumes the original's run folder.

Test-only stand-in: with ``TLIT_SWEEP_STANDIN=SECONDS`` in the environment a trial does not train; it sleeps
SECONDS over four "validations", reports a deterministic function of its parameters (``standin_score``) and
writes a stand-in summary (``"stand_in": true``). The process-level tests and benchmarks of storage and
workers use it; nothing else should.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from experiments.runs import folder as RF
from experiments.runs import run as R
from experiments.runs.folder import RunInfo
from experiments.sweeps.space import SweepSpec
from transformer_lit import config as C

STANDIN_ENV = "TLIT_SWEEP_STANDIN"
STANDIN_LOG = "standin.log"
"""A stand-in trial's run folder: one line per attempt (tests count them)."""
PRUNED = RF.PRUNED
STUDY_KEY_ATTR = "tlit_study_key"
"""Study user attribute: the random key of the study's trial folders (set by ``runner.open_study``)."""

Objective = Callable[[optuna.Trial], float | list[float]]


def study_key(study: optuna.Study) -> str:
    """The study's folder key: drawn once, kept in the study's storage. ``open_study`` draws it under the
    budget lock; a study made otherwise (tests, a notebook) gets one here."""
    key = study.user_attrs.get(STUDY_KEY_ATTR)
    if not key:
        key = uuid.uuid4().hex[:8]
        study.set_user_attr(STUDY_KEY_ATTR, key)
    return str(key)


def trial_dir(runs_root: str | Path, spec: SweepSpec, key: str, number: int, seed: int) -> Path:
    return Path(runs_root) / spec.study / spec.scale / f"study-{key}" / f"trial{number:04d}" / f"seed{seed}"


def make_objective(spec: SweepSpec, runs_root: str | Path, extra: list[str]) -> Objective:
    seconds = os.environ.get(STANDIN_ENV)
    if seconds:
        return lambda trial: standin_objective(spec, trial, runs_root, extra, float(seconds))
    return lambda trial: train_objective(spec, trial, runs_root, extra)


def prepare_trial(
    spec: SweepSpec, trial: optuna.Trial, runs_root: str | Path, extra: list[str]
) -> tuple[C.RunConfig, RunInfo, Path]:
    """The trial's config, names and run folder, planned there (config.yaml, run.json) like a grid's run; a
    retry of a killed trial resumes the original's folder."""
    values = spec.trial_values(trial, extra)
    cfg = spec.config(values, extra)
    key = study_key(trial.study)
    run_dir = trial_dir(runs_root, spec, key, trial.number, cfg.train.seed)
    origin = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    if origin is not None:
        old = trial_dir(runs_root, spec, key, int(origin), cfg.train.seed)
        unusable = (RF.RunState.PENDING, RF.RunState.CONFLICT, RF.RunState.CORRUPT)
        if RF.classify(old, expected=cfg, check_lock=False).state not in unusable:
            run_dir = old
    trial.set_user_attr("run_dir", str(run_dir))
    info = RunInfo(grid=spec.study, scale=spec.scale, row=run_dir.parent.name)
    R.plan(run_dir, cfg, info)
    return cfg, info, run_dir


def train_objective(spec: SweepSpec, trial: optuna.Trial, runs_root: str | Path, extra: list[str]) -> Any:
    """Train the trial's config into its run folder with the pruning callback; return its objective(s)."""
    from experiments.sweeps.pruning import StepPruningCallback, close_wandb  # Lightning only for real trials

    cfg, info, run_dir = prepare_trial(spec, trial, runs_root, extra)
    pruning = StepPruningCallback(trial, spec.monitor) if spec.pruner != "none" else None
    try:
        summary = R.train(cfg, run_dir, info, callbacks=[pruning] if pruning else [])
    except optuna.TrialPruned:
        assert pruning is not None
        write_pruned(run_dir, spec, trial, pruning.pruned_at, cfg.train.max_steps, pruning.reported)
        close_wandb("pruned")
        raise
    except BaseException as err:
        close_wandb("failed")
        if isinstance(err, Exception):
            RF.mark_failed(run_dir, f"{type(err).__name__}: {err}")
        raise
    return objective_values(spec, trial, summary)


def objective_values(spec: SweepSpec, trial: optuna.Trial, summary: dict[str, Any]) -> float | list[float]:
    if not summary or summary.get("status") != "complete":
        raise RuntimeError(f"trial {trial.number} ended without a complete summary")
    for key in ("ppl_dev", "bleu_dev", "train_steps"):
        if key in summary:
            trial.set_user_attr(key, summary[key])
    values = [float(summary[o]) for o in spec.objectives]
    return values[0] if len(values) == 1 else values


def write_pruned(
    run_dir: Path, spec: SweepSpec, trial: optuna.Trial, step: int | None, max_steps: int, reported: dict
) -> None:
    """The run folder's record of a trial stopped by the pruner (state "pruned", not complete)."""
    RF.write_json_atomic(
        run_dir / PRUNED,
        {
            "status": "pruned",
            "study": spec.study,
            "trial": trial.number,
            "train_steps": step,
            "max_steps": max_steps,
            "monitor": spec.monitor,
            "intermediate_values": {str(k): v for k, v in reported.items()},
            "time": time.time(),
        },
    )
    trial.set_user_attr("train_steps", step)


def standin_objective(
    spec: SweepSpec, trial: optuna.Trial, runs_root: str | Path, extra: list[str], seconds: float
) -> Any:
    """Test-only trial (``TLIT_SWEEP_STANDIN``): no training, same folders, reports and pruning."""
    cfg, _, run_dir = prepare_trial(spec, trial, runs_root, extra)
    with (run_dir / STANDIN_LOG).open("a") as f:  # one line per attempt: tests look for duplicates
        where = (os.environ.get("CUDA_VISIBLE_DEVICES", "-"), os.environ.get("OMP_NUM_THREADS", "-"))
        f.write(f"{trial.number} {os.getpid()} {time.time():.3f} cuda={where[0] or '-'} threads={where[1]}\n")
    score = standin_score(spec, trial.params)
    reported: dict[int, float] = {}
    for i in range(1, 5):
        time.sleep(seconds / 4)
        step = max(i, cfg.train.max_steps * i // 4)
        ppl = score * (1 + 1 / i)
        value = ppl if spec.monitor == "val/ppl" else 100 / ppl
        if spec.pruner == "none":  # as a training trial: no pruning callback, no reports
            continue
        reported[step] = value
        trial.report(value, step)
        if i < 4 and trial.should_prune():
            write_pruned(run_dir, spec, trial, step, cfg.train.max_steps, reported)
            raise optuna.TrialPruned(f"pruned at step {step}")
    summary = {
        "grid": spec.study,
        "scale": spec.scale,
        "row": run_dir.parent.name,
        "seed": cfg.train.seed,
        "ppl_dev": score,
        "bleu_dev": 100 / score,
        "train_steps": cfg.train.max_steps,
        "status": "complete",
        "stand_in": True,
    }
    RF.write_summary(run_dir, summary)
    return objective_values(spec, trial, summary)


def standin_score(spec: SweepSpec, params: dict[str, Any]) -> float:
    """A smooth, deterministic PPL-like score with its best inside the space (for tests and benchmarks)."""
    total = 0.0
    for name, p in spec.params.items():
        v = params[name]
        if p.kind == "categorical":
            x = p.choices.index(v) / max(1, len(p.choices) - 1)
        elif p.high == p.low:
            x = 0.0
        elif p.log:
            x = (math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low))
        else:
            x = (v - p.low) / (p.high - p.low)
        total += (x - 0.3) ** 2
    return 5.0 + 20.0 * total
