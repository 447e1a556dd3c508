"""Lightning's files in the run folder, written so that kills, retries and full disks lose nothing.

- ``VerifiedCheckpointIO`` writes a checkpoint to a temporary name, fsyncs it, checks its size and that it
  loads with ``weights_only=True``, and only then renames it onto ``last.ckpt`` or ``step=NNNNNNN.ckpt``.
  A full disk makes the save fail (and the attempt with it, to be retried); the old checkpoint stays.
- ``resume_checkpoint`` picks what to resume from: ``last.ckpt`` if it loads, else the newest periodic
  checkpoint that loads (with a warning naming both), else one line saying what to delete.
- ``StepCheckpoint`` takes a periodic checkpoint after that step's validation and training row, not before
  them, so a resumed run never skips a row that the killed attempt did not log.
- ``ResumableCSVLogger`` keeps ``metrics.csv`` across resumes (Lightning's CSV logger deletes it): the
  rows logged before the checkpoint's step stay, the rows the killed attempt logged after it are dropped
  (they are logged again), and every row reaches the disk as it is logged.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from experiments.runs import folder as RF

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def load_problem(path: Path) -> str:
    """Why ``path`` cannot be resumed from ("" when it loads with ``weights_only=True``)."""
    if not RF.looks_whole(path):
        return "cut short (its zip directory is missing or points past its end)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to load means "not this one"
        first = " ".join(str(err).split()).split(". ")[0]  # torch's messages go on about internals
        return first[:160] or type(err).__name__
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning checkpoint (no state_dict or global_step)"
    return ""


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are whole or absent: temp name, fsync, size and load check, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        written = 0

        def verify(tmp: Path) -> None:
            size = tmp.stat().st_size
            if size != written:
                raise OSError(f"checkpoint {path}: {size} bytes on disk, {written} written; it was not kept")
            problem = load_problem(tmp)
            if problem:
                raise OSError(f"checkpoint {path} does not load back ({problem}); it was not kept")

        with RF.atomic_path(Path(path), verify=verify) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            written = f.tell()


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step: ``last.ckpt`` if it loads, else the newest periodic one
    that loads (a warning names both); (None, 0) when the run has no checkpoint.

    Raises:
        RunFolderConflict: there are checkpoints, and none of them loads (one line: what to delete).
    """
    bad: list[tuple[Path, str]] = []
    for path in RF.resume_candidates(run_dir):
        problem = load_problem(path)
        if problem:
            bad.append((path, problem))
            continue
        if bad:
            log.warning(
                "%s cannot be read (%s); resuming from %s instead: the steps after it are trained again",
                bad[0][0],
                bad[0][1],
                path,
            )
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        return path, int(step)
    if bad:
        raise RF.RunFolderConflict(f"{run_dir}: {RF.NO_READABLE_CHECKPOINT}; {RF.restart_advice(run_dir)}")
    return None, 0


class StepCheckpoint(ModelCheckpoint):
    """Periodic checkpoints every ``every_n_train_steps``, taken after the validation of the same step.

    Lightning saves a step checkpoint in ``on_train_batch_end``, which runs before that step's validation. A
    kill between the two leaves a checkpoint whose validation row was never logged, and the resumed run
    starts after that step: the row would be missing from ``metrics.csv`` for good. So on a step that also
    validates, the save waits for ``on_validation_end`` (and for the end of training, should no validation
    come). Lightning also logs a step's training row after every callback's ``on_train_batch_end``, so after
    a save there; the save first hands that row to ``ResumableCSVLogger`` (``_write_training_row_first``).
    """

    def __init__(self, *, val_every_n_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._val_every = val_every_n_steps
        self._after_validation = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        due = self._every_n_train_steps > 0 and step % self._every_n_train_steps == 0
        if due and step != self._last_global_step_saved:
            if step % self._val_every == 0:
                self._after_validation = True  # micro-batches of the next step see the same global_step
                return
            if not self._should_skip_saving_checkpoint(trainer):
                _write_training_row_first(trainer)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_if_waiting(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_if_waiting(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_if_waiting(self, trainer: Any) -> None:
        if not self._after_validation or self._should_skip_saving_checkpoint(trainer):
            return
        self._after_validation = False
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def _write_training_row_first(trainer: Any) -> None:
    """The training row Lightning will log after this hook (``update_train_step_metrics``), written now to
    ``metrics.csv``: the checkpoint about to be saved resumes after it, so a kill in between would lose it."""
    connector = trainer._logger_connector
    if not trainer.is_global_zero or not connector.should_update_logs:
        return
    row = convert_tensors_to_scalars(connector.metrics["log"])
    if not row:
        return
    row.setdefault("epoch", trainer.current_epoch)  # as Lightning's own log_metrics adds it
    step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning will log it under
    for logger in trainer.loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.log_ahead(row, step)


# ----------------------------------------------------------------------------------------------------------
# metrics.csv


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing file, cut back to the rows before
    ``keep_before`` (their columns kept), and with header rewrites that are atomic."""

    NAME_METRICS_FILE = RF.METRICS

    def __init__(self, log_dir: str, keep_before: int) -> None:
        self._keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        header, rows = _read_rows(path)
        kept = [r for r in rows if (step := _step(r)) is not None and step < self._keep_before]
        columns = sorted(k for k in header if k)  # the order Lightning writes, which appends under it
        if len(kept) != len(rows) or columns != header:
            log.info("%s: %d rows before step %d kept, %d dropped", path, len(kept), self._keep_before,
                     len(rows) - len(kept))  # fmt: skip
            _write_rows(path, columns, kept)
        self.metrics_keys = columns

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        _, rows = _read_rows(path)
        _write_rows(path, fieldnames, rows)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows (a last line cut short by a kill is dropped)."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if None not in r and None not in r.values()]
    return header, rows


def _write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with RF.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step", "")))
    except ValueError:
        return None


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder, kept across resumes (see the module docstring).

    Args:
        run_dir: the run folder.
        resume_step: the global step of the checkpoint this attempt resumes from (0: from scratch). Lightning
            logs the metrics of optimizer step ``s`` (1-based) with ``step = s - 1``, so rows with
            ``step < resume_step`` are the history up to the checkpoint.
    """

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        super().__init__(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=1)
        self._resume_step = resume_step
        self._written_ahead: int | None = None  # the step of a row written before Lightning logs it

    @rank_zero_only
    def log_ahead(self, metrics: dict[str, float], step: int) -> None:
        """Writes a row before Lightning logs it (``StepCheckpoint``); Lightning's copy is then dropped."""
        super().log_metrics(metrics, step)
        self.save()
        self._written_ahead = step

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is not None and step == self._written_ahead:
            self._written_ahead = None
            return  # Lightning's copy of the row written ahead
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._resume_step)
        return self._experiment
