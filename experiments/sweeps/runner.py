"""Optuna sweeps over the Table 3 knobs: each trial is a run folder, workers share one study.

``tlit sweep FILE`` loads a sweep file (``sweep_file.py``), opens or creates its study (``sweep_storage.py``)
and runs workers until the study holds ``trials`` finished (complete or pruned) trials:

- a **trial** (``trials.py``) trains into ``results/runs/<study>/<scale>/study-<key>/trial<NNNN>/seed<k>``
  (``<key>``: the study's own, so two studies never share a folder), reporting dev PPL at every validation
  to the pruner; a pruned one's folder says so.
- a **worker** loops: under the budget lock, fail stale trials (dead workers), count the trials and ask for
  one if the study still needs one (or a retry waits); then train it with a heartbeat. No trial is lost
  (a killed worker's trial is retried, resuming its run folder) or started beyond the budget.
- ``--workers K`` starts K worker processes on this node's device slots, with the grid launcher's slot
  parsing and environment (one thread per CPU worker, ``CUDA_VISIBLE_DEVICES`` per GPU worker;
  ``--jobs-per-device n`` seats n workers on each GPU and splits the CPU threads between them).

``tlit sweep FILE --report`` and ``--export-best`` live in ``sweep_report.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from experiments.runs import folder as RF
from experiments.runs.prepare import prepare_for
from experiments.sweeps import storage as sweep_storage
from experiments.sweeps.space import SweepError, SweepSpec, make_pruner, make_sampler
from experiments.sweeps.trials import (
    PRUNED,
    STANDIN_ENV,
    STUDY_KEY_ATTR,
    Objective,
    make_objective,
    study_key,
    trial_dir,
)

__all__ = [
    "PRUNED",
    "STANDIN_ENV",
    "STUDY_KEY_ATTR",
    "open_study",
    "run_sweep",
    "run_trial",
    "run_worker",
    "trial_dir",
]

log = logging.getLogger(__name__)

STORAGE_ENV = "TLIT_SWEEP_STORAGE"
FINGERPRINT_ATTR = "tlit_sweep"
TRIALS_ATTR = "tlit_trials"
"""Study user attribute: the trials the study was last run to reach (``--trials``), which the report counts
against when it is not given ``--trials`` itself."""
REPLACEMENTS = 2
"""A worker that dies (killed, crashed) is started again on its slot this many times while trials remain."""
MAX_FAILURES = 3
"""A worker gives up after this many trials in a row fail (a broken config would otherwise loop)."""


@dataclass(frozen=True)
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def counts(study: optuna.Study) -> Counts:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return Counts(
        *(
            states.count(s)
            for s in (
                TrialState.COMPLETE,
                TrialState.PRUNED,
                TrialState.FAIL,
                TrialState.RUNNING,
                TrialState.WAITING,
            )
        )
    )


def requested_trials(study: optuna.Study, default: int) -> int:
    """The trials the study was last asked to reach (``TRIALS_ATTR``), else ``default`` (the file's)."""
    value = study.user_attrs.get(TRIALS_ATTR)
    return int(value) if isinstance(value, int) and value > 0 else default


def sweep_dir(sweeps_root: str | Path, spec: SweepSpec) -> Path:
    return Path(sweeps_root) / spec.study


# ----------------------------------------------------------------------------------------------------------
# The study


def open_study(spec: SweepSpec, storage: sweep_storage.Storage, *, worker: int = 0) -> optuna.Study:
    """Create the study or load it (re-running a command continues it); refuse one made from another file."""
    backend = sweep_storage.open_storage(
        storage,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=spec.grace_period,
        retries=spec.retries,
    )
    with sweep_storage.budget_lock(storage, spec.study):
        study = optuna.create_study(
            storage=backend,
            study_name=spec.study,
            directions=spec.directions,
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
        # The file's seed, offset per worker and by the trials already there: parallel workers and a rerun
        # (whose fresh random generators would repeat the first run's draws) sample different points.
        study.sampler = make_sampler(spec, seed=worker + 1009 * len(study.get_trials(deepcopy=False)))
        study_key(study)  # drawn here, under the lock, so that parallel workers agree on it
        mine = _plain(spec.fingerprint())
        theirs = study.user_attrs.get(FINGERPRINT_ATTR)
        if theirs is None:
            study.set_user_attr(FINGERPRINT_ATTR, mine)
        elif _plain(theirs) != mine:
            what = _first_difference(theirs, mine)
            raise SweepError(
                f"study {spec.study!r} in {storage} was made with a different {what}; "
                "use --study NAME for a new study"
            )
    return study


def _plain(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True))


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    order = ["scale", "grid", "row", "objectives", "constraint", "params", "base"]
    for key in order + sorted((set(old) | set(new)) - set(order)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                return f"{key} ({sub}: {a.get(sub)!r} there, {b.get(sub)!r} now)"
            return f"{key} ({a!r} there, {b!r} now)"
    return "file"


# ----------------------------------------------------------------------------------------------------------
# A worker


def run_worker(
    spec: SweepSpec,
    storage: sweep_storage.Storage,
    *,
    runs_root: str | Path = "results/runs",
    worker: int = 0,
    extra: Sequence[str] = (),
    objective: Objective | None = None,
) -> Counts:
    """Run trials until the study has ``spec.budget`` finished ones; returns the study's counts at the end.

    ``extra`` are overrides that say where this worker runs (threads, accelerator); not part of the study.
    """
    study = open_study(spec, storage, worker=worker)
    objective = objective or make_objective(spec, runs_root, list(extra))
    poll = 1.0  # an idle worker looks for retries this often; also its delay in noticing the study is done
    failures = 0
    with _sigterm_as_interrupt():
        while True:
            with sweep_storage.budget_lock(storage, spec.study):
                sweep_storage.fail_stale_trials(study)
                c = counts(study)
                wanted = c.waiting > 0 or c.finished + c.running + c.waiting < spec.budget
                with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize"
                    warnings.filterwarnings("ignore", message=".*Heartbeat.*")
                    trial = study.ask() if wanted else None
            if trial is None:
                if c.running == 0:
                    return c
                time.sleep(poll)  # another worker's trial may die and come back as a retry
                continue
            state = run_trial(study, trial, objective)
            failures = failures + 1 if state == TrialState.FAIL else 0
            if failures >= MAX_FAILURES:
                raise SweepError(f"{failures} trials in a row failed in worker {worker}; see the log above")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (the supervisor stopping its workers) ends the trial like Ctrl-C: marked failed and queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        # once: a second SIGTERM (SLURM signals every process of a job, and so may a supervisor) must not
        # interrupt the hand-back of the trial below
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> TrialState:
    """Evaluate one asked trial with a heartbeat and tell the study; an interrupted trial is queued again."""
    values: Any = None
    with _heartbeat(study, trial):
        try:
            values = objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as err:
            log.info("trial %d pruned: %s", trial.number, err)
            state = TrialState.PRUNED
        except (KeyboardInterrupt, SystemExit):
            _hand_back(study, trial)
            raise
        except Exception:
            log.exception("trial %d failed", trial.number)
            state = TrialState.FAIL
    return _tell(study, trial, state, values)


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: Any = None) -> TrialState:
    if _finished_elsewhere(study, trial):
        log.warning("trial %d was finished by another worker (heartbeat lost?)", trial.number)
        return study._storage.get_trial(trial._trial_id).state
    try:
        complete = state == TrialState.COMPLETE
        frozen = study.tell(trial, values) if complete else study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was finished by another worker (heartbeat lost?)", trial.number)
        return study._storage.get_trial(trial._trial_id).state
    if frozen.state == TrialState.COMPLETE:
        shown = ", ".join(
            f"{n}={v:.4g}" for n, v in zip(_objective_names(study), frozen.values, strict=False)
        )
        log.info("trial %d complete: %s", trial.number, shown)
    return frozen.state


def _objective_names(study: optuna.Study) -> list[str]:
    fp = study.user_attrs.get(FINGERPRINT_ATTR) or {}
    return list(fp.get("objectives") or ["value"])


def _hand_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted trial: failed and queued again, unless another worker has already failed it (this
    worker was frozen or cut off past the grace period, and the heartbeat rule queued it): never twice."""
    try:
        if not _finished_elsewhere(study, trial):
            study.tell(trial, state=TrialState.FAIL)
            _requeue(study, trial)
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    log.warning("trial %d was already failed and queued again by another worker", trial.number)


def _finished_elsewhere(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Another worker failed this trial (its heartbeat went stale): telling it now raises in Optuna."""
    return study._storage.get_trial(trial._trial_id).state.is_finished()


def _requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial again with its parameters (its run folder resumes from its checkpoint)."""
    callback = getattr(study._storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is not None:
        with contextlib.suppress(Exception):
            callback(study, study._storage.get_trial(trial._trial_id))


@contextlib.contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    storage = study._storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception as err:  # the trial was failed by another worker, or the database went away
                log.warning("heartbeat of trial %d stopped: %s", trial.number, err)
                return
            stop.wait(interval)

    storage.record_heartbeat(trial._trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------------------------------------
# Several workers on this node


def worker_argv(spec: SweepSpec, index: int, runs_root: str | Path, overrides: Sequence[str]) -> list[str]:
    """A worker's command; the storage URL travels in the environment (``TLIT_SWEEP_STORAGE``), not argv."""
    return [
        sys.executable,
        "-m",
        "experiments.cli",
        "sweep",
        str(spec.path),
        "--worker",
        str(index),
        "--study",
        spec.study,
        "--scale",
        spec.scale,
        "--trials",
        str(spec.trials),
        "--runs",
        str(runs_root),
        *overrides,
    ]


def launch_workers(
    spec: SweepSpec,
    storage: sweep_storage.Storage,
    study: optuna.Study,
    *,
    workers: int,
    devices: str,
    jobs_per_device: int = 1,
    runs_root: str | Path,
    sweeps_root: str | Path,
    overrides: Sequence[str] = (),
    out: TextIO | None = None,
    every: float = 30.0,
) -> list[int]:
    """Start ``workers`` worker processes on the slots of ``devices`` (``jobs_per_device`` sharing each GPU)
    and wait for them; returns their exit codes. Ctrl-C or SIGTERM stops them (their trials are queued
    again for the next run). A packing is checked against the card with the sweep's base config."""
    from experiments.launchers import base as B
    from experiments.launchers.local import LocalLauncher, check_packing, parse_devices
    from transformer_lit.memory import training_memory

    slots = parse_devices(devices, jobs_per_device)
    if workers > len(slots):
        raise SweepError(
            f"--workers {workers} needs {workers} device slots; --devices {devices} gives {len(slots)}"
        )
    base_memory = training_memory(spec.base_config()).total
    check_packing(slots, [(f"{spec.study}/worker{i}", base_memory) for i in range(workers)])
    launcher = LocalLauncher(slots=slots)
    seats = slots.seat_ids()
    logs = sweep_dir(sweeps_root, spec) / "workers"
    logs.mkdir(parents=True, exist_ok=True)

    def start(i: int) -> subprocess.Popen:
        argv = worker_argv(spec, i, runs_root, [*overrides, *launcher.device_overrides()])
        job = B.Job(name=f"{spec.study}/worker{i}", argv=argv, run_dir=logs)
        fd = os.open(logs / f"worker{i}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"\n=== tlit sweep {spec.study}: worker {i} on {slots.kind}:{seats[i]} ===\n".encode())
        try:
            env = {**launcher.env_for((seats[i],)), STORAGE_ENV: storage_text(storage)}
            return B.spawn(job, env, fd)
        finally:
            os.close(fd)

    procs = [start(i) for i in range(workers)]
    replaced = [0] * workers
    if out is not None:
        print(f"{spec.study}: {workers} workers on {slots}, logs in {logs}", file=out, flush=True)
    with _sigterm_as_interrupt():
        try:
            last = time.monotonic()
            while True:
                for i, p in enumerate(procs):
                    if p.poll() is not None and _replace(p, replaced[i], spec, study):
                        replaced[i] += 1
                        why = B.failure_message(p.returncode, logs)
                        procs[i] = start(i)
                        note = f"worker {i} {why}; started again ({replaced[i]}/{REPLACEMENTS})"
                        log.warning("%s", note)
                        if out is not None:
                            print(note, file=out, flush=True)
                if all(p.poll() is not None for p in procs):
                    break
                time.sleep(0.5)
                if out is not None and time.monotonic() - last >= every:
                    last = time.monotonic()
                    print(progress_line(spec, study), file=out, flush=True)
        except KeyboardInterrupt:
            B.terminate(procs, grace=15.0)
            raise
    return [p.returncode for p in procs]


def launch_slurm_workers(
    spec: SweepSpec,
    storage: sweep_storage.Storage,
    study: optuna.Study,
    *,
    workers: int,
    launcher: Any,
    runs_root: str | Path,
    sweeps_root: str | Path,
    overrides: Sequence[str] = (),
    out: TextIO | None = None,
    every: float = 30.0,
) -> list[int]:
    """Submit ``workers`` workers as one SLURM job array (``launcher``: a ``SlurmLauncher``) sharing the
    study's storage, and wait for them unless the launcher does not wait; returns their exit codes (0 for a
    worker SLURM cancelled or preempted: its trial is retried by the heartbeat rule). The journal file must
    be on a filesystem every node sees (it is passed as an absolute path), or use PostgreSQL."""
    from experiments.launchers import base as B
    from experiments.launchers import slurm as S
    from experiments.launchers import slurm_jobs

    logs = (sweep_dir(sweeps_root, spec) / "workers").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    env = {STORAGE_ENV: storage_text(storage, absolute=True)}
    if not launcher.options.gpus:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    jobs = [
        B.Job(
            f"{spec.study}/worker{i}",
            worker_argv(spec, i, runs_root, [*overrides, *launcher.device_overrides()]),
            logs,
            env=env,
        )
        for i in range(workers)
    ]
    handles = launcher.map_array(
        1, S.CommandTask(), jobs, [str(logs / f"worker{i}.log") for i in range(workers)]
    )
    ids = ", ".join(str(h.job_id) for h in handles)
    if out is not None:
        print(f"{spec.study}: {workers} workers as SLURM tasks {ids}, logs in {logs}", file=out, flush=True)
    if not launcher.wait:
        return [0] * workers
    codes: list[int | None] = [None] * workers
    last = time.monotonic()
    while any(c is None for c in codes):
        for i, handle in enumerate(handles):
            if codes[i] is None and handle.done():
                codes[i] = _worker_code(handle, slurm_jobs)
        if any(c is None for c in codes):
            time.sleep(min(launcher.poll, 2.0))
        if out is not None and time.monotonic() - last >= every:
            last = time.monotonic()
            print(progress_line(spec, study), file=out, flush=True)
    return [int(c or 0) for c in codes]


def _worker_code(handle: Any, slurm_jobs: Any) -> int:
    """A finished worker task's exit status; 0 for one SLURM ended from outside (cancelled, preempted)."""
    try:
        return int(handle.result())
    except Exception as err:  # no result: killed, or the worker task failed
        task = str(handle.job_id)
        state = slurm_jobs.job_states([task]).get(task, "")
        if state in slurm_jobs.INTERRUPTED:
            log.warning("worker task %s ended %s; its trial is retried by the heartbeat rule", task, state)
            return 0
        log.warning("worker task %s failed (%s): %s", task, state or "?", " ".join(str(err).split())[:200])
        return 1


def _replace(proc: subprocess.Popen, replaced: int, spec: SweepSpec, study: optuna.Study) -> bool:
    """Start a dead worker again? Only one that died (a signal, a crash: not a clean exit or a user error,
    which would only fail again) while the study still needs trials, at most ``REPLACEMENTS`` times."""
    from experiments.launchers.base import USER_ERROR_EXIT

    rc = proc.returncode
    if rc is None or rc in (0, USER_ERROR_EXIT) or replaced >= REPLACEMENTS:
        return False
    return counts(study).finished < spec.budget


def run_sweep(
    spec: SweepSpec,
    storage_url: str | None,
    *,
    workers: int = 1,
    devices: str | None = None,
    jobs_per_device: int = 1,
    runs_root: str | Path = "results/runs",
    sweeps_root: str | Path = "results/sweeps",
    overrides: Sequence[str] = (),
    out: TextIO | None = None,
    slurm: Any = None,
) -> int:
    """``tlit sweep FILE``: check the storage, create or continue the study, run its workers (in this process
    when one worker and no ``devices``; as a SLURM job array with ``slurm``, a ``SlurmLauncher``), and
    return 0 once the study has its trials."""
    storage = sweep_storage.parse_storage(
        storage_url or sweep_storage.default_storage(sweeps_root, spec.study)
    )
    sweep_storage.check_storage(storage)
    if workers < 1:  # the command line checks this first; a caller of this function gets the same line
        raise SweepError(f"--workers must be a positive integer, got {workers}")
    RF.check_writable(Path(runs_root))  # an unwritable --runs: one line here, not a failure in every trial
    study = open_study(spec, storage)
    study.set_user_attr(TRIALS_ATTR, spec.budget)
    if counts(study).finished >= spec.budget:  # a rerun with nothing left to do starts nothing
        if out is not None:
            print(f"{progress_line(spec, study)}; nothing left to do", file=out, flush=True)
        return 0
    prepare_for([spec.base_config()], out)  # before any worker starts (the file's overrides are in spec)
    if out is not None:
        print(f"{progress_line(spec, study)}; storage {storage}", file=out, flush=True)
    codes = [0]
    if slurm is not None:
        codes = launch_slurm_workers(
            spec,
            storage,
            study,
            workers=workers,
            launcher=slurm,
            runs_root=runs_root,
            sweeps_root=sweeps_root,
            overrides=overrides,
            out=out,
        )
        if not slurm.wait:
            return 0
    elif workers == 1 and devices is None:
        run_worker(spec, storage, runs_root=runs_root)
    else:
        codes = launch_workers(
            spec,
            storage,
            study,
            workers=workers,
            devices=devices or "all",
            jobs_per_device=jobs_per_device,
            runs_root=runs_root,
            sweeps_root=sweeps_root,
            overrides=overrides,
            out=out,
        )
    done = counts(study).finished >= spec.budget
    if out is not None:
        print(progress_line(spec, study), file=out, flush=True)
        failed = [i for i, rc in enumerate(codes) if rc != 0]
        if failed:
            logs = sweep_dir(sweeps_root, spec) / "workers"
            outcome = "; every trial finished all the same" if done else ""
            print(
                f"workers {failed} exited with {[codes[i] for i in failed]} (see {logs}){outcome}",
                file=out,
                flush=True,
            )
    return 0 if done else 1  # the study's trials, not how its workers ended, decide


def _silent_note(study: optuna.Study, running: int) -> str:
    """`` (1 of them silent: its worker died; retried in 40 s, once the heartbeat grace has passed)``:
    why a running trial with no live worker is still counted as running."""
    grace = sweep_storage.grace_period(study)
    interval = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    if not running or not grace or not interval:
        return ""
    ages = [a for a in sweep_storage.heartbeat_ages(study).values() if a > 2 * interval]
    if not ages:
        return ""
    left = max(0.0, grace - max(ages))
    return (
        f" ({len(ages)} of them silent: waiting {left:.0f} s more for a stale worker's heartbeat "
        f"(grace {grace:.0f} s), then its trial is retried)"
    )


def storage_text(storage: sweep_storage.Storage, absolute: bool = False) -> str:
    """The storage as workers get it (``TLIT_SWEEP_STORAGE``); ``absolute``: a journal's full path, for
    workers that start elsewhere (SLURM nodes)."""
    if storage.kind != "journal":
        return storage.url
    return str(Path(storage.path).resolve()) if absolute else str(storage.path)


def progress_line(spec: SweepSpec, study: optuna.Study) -> str:
    c = counts(study)
    line = (
        f"{spec.study}/{spec.scale}: {c.finished}/{spec.budget} finished ({c.complete} complete, "
        f"{c.pruned} pruned), {c.running} running{_silent_note(study, c.running)}, {c.failed} failed"
    )
    with contextlib.suppress(ValueError, RuntimeError):
        if len(spec.objectives) == 1:
            best = study.best_trial
            line += f"; best {spec.objectives[0]} {best.value:.4g} (trial {best.number})"
    return line
