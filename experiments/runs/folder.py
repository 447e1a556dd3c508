"""The run folder: the one module that knows its files, tells what state a run is in, and writes files.

A run folder (``results/runs/<grid>/<scale>/<row>/seed<k>``, or a sweep trial's) is the contract between
training, the launchers, ``tlit grid status``, ``tlit table`` and sweeps (docs/DESIGN.md, "Run folder")::

    config.yaml        the resolved config, written by the process that plans the run; training reads it
    run.json           who the run is (grid, scale, row): the summary's and W&B's names
    summary.json       written last: the run is complete when it says "status": "complete"
    failed.json        the last launcher's verdict on a failed run (error, log tail)
    pruned.json        a sweep trial stopped by its pruner
    metrics.csv        Lightning's CSV log, appended across resumes
    train.log          stdout and stderr of every attempt (launchers append, one header per attempt)
    run.lock           held while a process runs it (experiments.runs.locks)
    wandb_id.txt       the W&B run id: a resumed run continues the same W&B run
    checkpoints/       last.ckpt, periodic step=NNNNNNN.ckpt, tokenizer.model
    hyps_dev.txt, refs_dev.txt                 dev outputs of the final BLEU (significance tests)
    eval_<split>[_tag].json, hyps_<split>[_tag].txt   written by ``tlit eval``

Every file is written with ``write_atomic`` (temporary file, fsync, rename, fsync of the folder), so a
reader, a kill or a full disk never leaves half a file under its name.

``classify`` reads a folder and returns its ``RunState``: the one answer that ``tlit grid status``,
``tlit grid run``, ``tlit table``, ``tlit train``, the launchers and sweeps all use. It never imports torch:
a checkpoint is judged readable from its zip directory here; resuming verifies it with ``torch.load``.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from experiments.runs import lockfile
from transformer_lit import config as C
from transformer_lit.atomic import atomic_path, write_atomic, write_atomic_all

__all__ = ["atomic_path", "write_atomic", "write_atomic_all"]  # re-exported: the one way to write files

# ----------------------------------------------------------------------------------------------------------
# Names

CONFIG = "config.yaml"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
FAILED = "failed.json"
PRUNED = "pruned.json"
METRICS = "metrics.csv"
LOG = "train.log"
LOCK = "run.lock"
SLURM_JOB = "slurm.json"
"""The SLURM task submitted for this run: ``{"job": "123_4", "folder": submitit's folder, "seconds": wall
seconds of its segments that ended (requeues)}``."""
WANDB_ID = "wandb_id.txt"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
PERIODIC_CKPT = "step={step:07d}"
"""Lightning's ModelCheckpoint ``filename`` template of periodic checkpoints (it appends ``.ckpt``)."""
_PERIODIC = re.compile(r"^step=(\d+)(?:-v\d+)?\.ckpt$")  # -v1 on a name clash
TOKENIZER = "tokenizer.model"
REFS_DEV = "refs_dev.txt"


def hyps_name(split: str = "dev", tag: str = "") -> str:
    """``hyps_dev.txt``: decoded outputs of a split (``tag``: how ``tlit eval`` decoded, e.g. ``_avg5``)."""
    return f"hyps_{split}{tag}.txt"


def eval_name(split: str = "dev", tag: str = "") -> str:
    """``eval_dev.json``: the scores ``tlit eval`` wrote for a split."""
    return f"eval_{split}{tag}.json"


HYPS_DEV = hyps_name("dev")

IDENTITY_FIELDS = ("grid", "scale", "row", "seed")
"""Summary fields that name the run; a summary whose names differ belongs to another run."""
RUNTIME_FIELDS = frozenset(
    {
        "train.accelerator",
        "train.compile",
        "train.keep_checkpoints",
        "train.loss_chunk_tokens",
        "train.num_threads",
        "train.progress_bar",
        "train.stall_timeout",
        "train.wandb",
        "train.wandb_project",
        "data.num_workers",
        "data.cache_dir",
    }
)
"""Where and how a run executes, not what it computes: a run may resume (or be reused) with other values.
``train.keep_checkpoints`` says only how many periodic checkpoints stay on disk for averaging."""

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~7x faster on a grid's configs


class RunFolderConflict(ValueError):
    """The run folder holds another run than the one asked for (or cannot be read); one line."""


@dataclass(frozen=True)
class RunInfo:
    """Names of a run, stored in run.json and the summary and used as W&B group/job_type."""

    grid: str = "adhoc"
    scale: str = "custom"
    row: str = "base"

    @property
    def group(self) -> str:
        return f"{self.grid}/{self.scale}"


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_writable(folder: Path) -> None:
    """Raise the OSError (naming the path) that writing into ``folder`` would meet: a read-only or full
    filesystem, or a file where a folder belongs. Creates nothing that stays: a probe file is written and
    removed in ``folder``'s nearest existing ancestor. So a command stops in one line before any work, not
    in every run or trial later."""
    folder = Path(folder)
    there = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not there.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    probe = there / f".tlit-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(folder)) from None
    probe.unlink()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The last file of a run: from now on it is complete (an earlier failure verdict goes)."""
    write_json_atomic(Path(run_dir) / SUMMARY, summary)
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def mark_failed(run_dir: Path, message: str, log_tail: str = "") -> None:
    write_json_atomic(
        Path(run_dir) / FAILED,
        {"status": "failed", "error": message, "log_tail": log_tail, "time": time.time()},
    )


def write_slurm_job(run_dir: Path, job_id: str, folder: str | Path) -> None:
    """The SLURM task just submitted for this run, and submitit's folder (where its result will be)."""
    write_json_atomic(
        Path(run_dir) / SLURM_JOB, {"job": job_id, "folder": str(Path(folder).resolve()), "time": time.time()}
    )


def read_slurm_job(run_dir: str | Path) -> tuple[str, Path] | None:
    """``(task id, submitit folder)`` of the SLURM task last submitted for this run, or None."""
    data, _ = _read_json(Path(run_dir) / SLURM_JOB)
    if not data or not isinstance(data.get("job"), str):
        return None
    return data["job"], Path(str(data.get("folder", ".")))


def slurm_seconds(run_dir: str | Path) -> float:
    """Wall seconds of the SLURM task's segments that ended before this one (0 without a record)."""
    data, _ = _read_json(Path(run_dir) / SLURM_JOB)
    return float((data or {}).get("seconds") or 0.0)


def add_slurm_seconds(run_dir: str | Path, seconds: float) -> None:
    """Add a segment that ended (the task was requeued) to the record, if the run has one: SLURM restarts a
    task it requeued itself from its first pickle, so the run folder keeps the count."""
    data, _ = _read_json(Path(run_dir) / SLURM_JOB)
    if data:
        write_json_atomic(Path(run_dir) / SLURM_JOB, {**data, "seconds": slurm_seconds(run_dir) + seconds})


def write_config(run_dir: Path, cfg: C.RunConfig) -> None:
    write_atomic(Path(run_dir) / CONFIG, C.to_yaml(cfg))


def write_info(run_dir: Path, info: RunInfo) -> None:
    write_json_atomic(Path(run_dir) / RUN_INFO, asdict(info))


def read_info(run_dir: Path) -> RunInfo:
    """The run's names; a folder planned before run.json existed gets the defaults (adhoc/custom/base)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return RunInfo()
    try:
        data = json.loads(path.read_text())
        return RunInfo(**{k: str(data[k]) for k in ("grid", "scale", "row")})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run.json (grid, scale, row): {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_config(run_dir: Path) -> tuple[C.RunConfig | None, str]:
    """The folder's config (None if it has none) and the problem with it ("" when it is valid)."""
    path = Path(run_dir) / CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, ""
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{CONFIG} is unreadable: {_one_line(err)}"
    try:
        return C.from_dict(yaml.load(text, Loader=_Loader)), ""  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        return None, f"{CONFIG} is unreadable: {_one_line(err)}"
    except (ValueError, TypeError) as err:
        return None, f"{CONFIG} is invalid: {_one_line(err)}"


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The summary of a complete run; None when there is none or it is not a valid complete summary."""
    summary, problem = _read_summary(Path(run_dir) / SUMMARY)
    return summary if summary is not None and not problem else None


def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{SUMMARY} is not valid JSON (truncated?): {err}"
    if not isinstance(data, dict):
        return None, f"{SUMMARY} is not a JSON object"
    if data.get("status") != "complete":
        return data, f"{SUMMARY} says status {data.get('status')!r}, not 'complete'"
    return data, ""


def _read_json(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """(content, exists) of a small JSON marker; content None when unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, True
    return (data if isinstance(data, dict) else None), True


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())[:160]


def live_lock(
    run_dir: str | Path, stale_after: float = lockfile.DEFAULT_STALE_AFTER
) -> lockfile.LockInfo | None:
    """The live holder of the folder's lock, or None when it is free or stale."""
    return lockfile.held(Path(run_dir) / LOCK, stale_after)


def config_difference(there: Mapping[str, Any], asked: Mapping[str, Any]) -> str | None:
    """``"model.d_k: 8 there, 4 now"`` for the first field of ``asked`` that ``there`` has otherwise (run-time
    fields aside); None when they agree. ``asked`` may hold only some fields (a table row's cells)."""
    for key, value in asked.items():
        if key not in RUNTIME_FIELDS and there.get(key) != value:
            return f"{key}: {there.get(key)!r} there, {value!r} now"
    return None


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointFiles(NamedTuple):
    """The checkpoints of one run: periodic ones sorted by step (oldest first) and ``last.ckpt``."""

    periodic: list[Path]
    last: Path | None


def checkpoint_files(ckpt_dir: str | Path) -> CheckpointFiles:
    """Periodic ``step=NNNNNNN.ckpt`` files sorted by step, and ``last.ckpt`` (None when absent)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return CheckpointFiles([], None)
    periodic = []
    for p in ckpt_dir.iterdir():
        m = _PERIODIC.match(p.name)
        if m and p.is_file():
            periodic.append((int(m.group(1)), p.stat().st_mtime, p))
    periodic.sort(key=lambda x: (x[0], x[1]))
    last = ckpt_dir / LAST_CKPT
    return CheckpointFiles([p for _, _, p in periodic], last if last.is_file() else None)


def periodic_step(path: Path) -> int | None:
    """The step in a periodic checkpoint's name (``step=0000100.ckpt`` -> 100); None for other names."""
    m = _PERIODIC.match(path.name)
    return int(m.group(1)) if m else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run may resume from, best first: ``last.ckpt``, then periodic ones newest first."""
    files = checkpoint_files(Path(run_dir) / CKPT_DIR)
    return ([files.last] if files.last else []) + files.periodic[::-1]


def looks_whole(path: Path) -> bool:
    """Cheap check (no torch) that a checkpoint is a complete ``torch.save`` zip archive: its central
    directory is there and every member lies inside the file. A file cut short by a full disk or a kill
    fails it; the real ``torch.load`` check happens when a run resumes."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    return bool(members) and all(m.header_offset + m.compress_size <= size for m in members)


# ----------------------------------------------------------------------------------------------------------
# State


class RunState(str, enum.Enum):
    """What a run folder holds. The value is the word every command shows."""

    COMPLETE = "complete"
    """The summary says complete (and the run is the one asked for)."""

    RUNNING = "running"
    """A live process holds ``run.lock``."""

    INTERRUPTED = "interrupted"
    """Started and stopped (killed, preempted): resumes from its last checkpoint, or starts over if none."""

    RECOVERABLE = "recoverable"
    """Interrupted, and ``last.ckpt`` is unreadable: resumes from the newest readable periodic checkpoint."""

    PENDING = "pending"
    """Nothing there yet."""

    FAILED = "failed"
    """``failed.json``: the last launcher gave up on it; the next ``grid run`` tries again."""

    PRUNED = "pruned"
    """A sweep's pruner stopped it (``pruned.json``)."""

    CONFLICT = "conflict"
    """Holds another run: a config that differs from the one asked for, or another run's summary."""

    CORRUPT = "corrupt"
    """Unusable as it is: an unreadable or invalid config or summary, or no readable checkpoint although
    ``last.ckpt`` exists. The detail says which file, and what to delete."""

    @property
    def resumable(self) -> bool:
        return self in (RunState.INTERRUPTED, RunState.RECOVERABLE)


@dataclass(frozen=True)
class Status:
    """A run folder's state, with what was read to decide it."""

    state: RunState
    detail: str = ""
    """One line: why this state, or what happens next (the failure, the lock holder, the checkpoint)."""
    where: Path | None = None
    """The file at fault when the folder is damaged or holds another run (warnings name it)."""
    summary: dict[str, Any] | None = None
    """The summary when it is a JSON object (complete or not)."""
    config: C.RunConfig | None = None
    lock: lockfile.LockInfo | None = None
    """The live holder (running) or the stale lock left behind (interrupted)."""
    resume_from: Path | None = None
    """The checkpoint an interrupted run resumes from (judged by ``looks_whole``)."""
    advice: str = ""
    """What to delete to go on, for a corrupt folder."""

    def refusal(self, run_dir: Path, elsewhere: str = "--out") -> str:
        """The one line that refuses to run into a conflicting or corrupt folder."""
        if self.state is RunState.CONFLICT:
            return f"{run_dir} {self.detail}; use another {elsewhere} or delete that folder"
        return f"{run_dir}: {self.detail}" + (f"; {self.advice}" if self.advice else "")


def classify(
    run_dir: str | Path,
    *,
    expected: C.RunConfig | Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    stale_after: float = lockfile.DEFAULT_STALE_AFTER,
    check_lock: bool = True,
) -> Status:
    """The state of ``run_dir``, checked in this order: a damaged config (corrupt); another run's summary
    (conflict); a damaged summary (corrupt); a config other than ``expected`` (conflict); a complete
    summary (complete); a live lock (running, even after an earlier failure: a retry); a failure verdict
    (failed); a pruner's stop (pruned); then the checkpoints (interrupted, recoverable, or corrupt when none
    is readable); a folder with anything but its plan (``PLANNED``) in it is interrupted; an empty, absent or
    only planned one is pending.

    Args:
        run_dir: the run folder.
        expected: the config asked for (whole, or only the fields to compare, flat); None: not compared.
        identity: the names the summary must carry (``grid``, ``scale``, ``row``, ``seed``), if known.
        stale_after: seconds without heartbeat after which another host's lock is stale.
        check_lock: False for the process that holds the lock itself (it is not "running" to itself).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return Status(RunState.PENDING)
    config, problem = read_config(run_dir)
    if problem:
        advice = f"delete {run_dir} to run it again"
        return Status(RunState.CORRUPT, problem, run_dir / CONFIG, advice=advice)
    summary_path = run_dir / SUMMARY
    summary, problem = _read_summary(summary_path)
    if summary is not None and (other := _another_run(summary, identity)):
        return Status(RunState.CONFLICT, other, summary_path, summary, config)
    if problem:
        advice = f"delete {summary_path} to finish the run again from its last checkpoint"
        return Status(RunState.CORRUPT, problem, summary_path, summary, config, advice=advice)
    if config is not None and expected is not None:
        asked = C.flat_dict(expected) if isinstance(expected, C.RunConfig) else expected
        if diff := config_difference(C.flat_dict(config), asked):
            detail = f"holds a run with a different config ({diff})"
            return Status(RunState.CONFLICT, detail, run_dir / CONFIG, summary, config)
    if summary is not None:
        return Status(RunState.COMPLETE, "", None, summary, config)
    return _unfinished(run_dir, config, stale_after, check_lock)


def _another_run(summary: dict[str, Any], identity: Mapping[str, Any] | None) -> str:
    if not identity or not any(k in summary and summary[k] != v for k, v in identity.items()):
        return ""
    said = " ".join(f"{k}={summary.get(k)}" for k in IDENTITY_FIELDS)
    return f"belongs to another run ({said})"


PLANNED = frozenset({CONFIG, RUN_INFO, SLURM_JOB})
"""What a planned (or submitted) run holds before it starts: still pending."""


def _unfinished(run_dir: Path, config: C.RunConfig | None, stale_after: float, check_lock: bool) -> Status:
    lock = lockfile.read(run_dir / LOCK) if check_lock else None
    if lock is not None and not lock.is_stale(stale_after):
        return Status(RunState.RUNNING, lock.describe() if lock.pid != -1 else "", config=config, lock=lock)
    failed, exists = _read_json(run_dir / FAILED)
    if exists:
        if failed is None:
            return Status(RunState.FAILED, f"{FAILED} is unreadable", run_dir / FAILED, config=config)
        return Status(RunState.FAILED, _one_line(failed.get("error", "")) or "failed", config=config)
    if (run_dir / PRUNED).is_file():
        return Status(RunState.PRUNED, "stopped by the sweep's pruner", config=config)
    notes = [f"stale {LOCK}" + (f" ({lock.describe()})" if lock.pid != -1 else "")] if lock else []
    state, detail, resume_from = _resume_point(run_dir)
    if state is RunState.PENDING and (lock or any(p.name not in PLANNED for p in run_dir.iterdir())):
        state, detail = RunState.INTERRUPTED, "no checkpoint yet: starts over"
    notes += [detail] if detail else []
    if state is RunState.CORRUPT:
        where, advice = run_dir / CKPT_DIR, restart_advice(run_dir)
    else:
        where, advice = None, ""
    return Status(state, "; ".join(notes), where, None, config, lock, resume_from, advice)


def _resume_point(run_dir: Path) -> tuple[RunState, str, Path | None]:
    files = checkpoint_files(run_dir / CKPT_DIR)
    if files.last is not None and looks_whole(files.last):
        return RunState.INTERRUPTED, f"resumes from {CKPT_DIR}/{LAST_CKPT}", files.last
    readable = next((p for p in reversed(files.periodic) if looks_whole(p)), None)
    if files.last is not None and readable is not None:
        detail = f"{CKPT_DIR}/{LAST_CKPT} is unreadable; resumes from {CKPT_DIR}/{readable.name}"
        return RunState.RECOVERABLE, detail, readable
    if readable is not None:
        return RunState.INTERRUPTED, f"resumes from {CKPT_DIR}/{readable.name}", readable
    if files.last is not None or files.periodic:
        return RunState.CORRUPT, NO_READABLE_CHECKPOINT, None
    return RunState.PENDING, "", None


NO_READABLE_CHECKPOINT = f"no checkpoint is readable ({LAST_CKPT} and every step=*.ckpt are damaged)"


def restart_advice(run_dir: Path) -> str:
    return f"delete {Path(run_dir) / CKPT_DIR} to train this run from the start"
