"""Checkpoints and metrics.csv across kills, failed resumes and a full disk (issue 12, must-fix 1 and 3).

Real Lightning Trainer on the micro config of test_train_run; the full disk is a real 8 MB tmpfs (root only).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from experiments.cli import main as tlit
from experiments.runs import folder as RF
from experiments.runs import run as R
from experiments.runs.lightning_io import resume_checkpoint
from experiments.tables.sources import read_curve
from tests.test_train_run import micro_args
from transformer_lit import config as C


def metric_rows(run_dir: Path) -> list[tuple[int, str, str]]:
    """(step, train/loss, val/ppl) of every row of metrics.csv."""
    with (run_dir / RF.METRICS).open(newline="") as fh:
        return [(int(r["step"]), r["train/loss"], r["val/ppl"]) for r in csv.DictReader(fh)]


def micro(tmp_path: Path, steps: int = 30) -> C.RunConfig:
    return C.apply_overrides(C.base(), [*micro_args(tmp_path, steps), "train.val_every_n_steps=10"])


# ----------------------------------------------------------------------------------------------------------
# Resume: an unreadable last.ckpt, none readable, a failed resume


def test_unreadable_last_checkpoint_falls_back_to_a_periodic_one(tmp_path, caplog):
    """last.ckpt cut short (a full disk): the run resumes from the newest loadable step=*.ckpt, warns naming
    both, and ends where an uninterrupted run ends; metrics.csv keeps the rows before that checkpoint."""
    cfg = micro(tmp_path)
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    R.train(cfg, straight)
    shutil.copytree(straight, damaged)
    (damaged / RF.SUMMARY).unlink()
    ckpts = damaged / RF.CKPT_DIR
    (ckpts / "step=0000030.ckpt").unlink()
    last = ckpts / RF.LAST_CKPT
    last.write_bytes(last.read_bytes()[: last.stat().st_size * 2 // 3])
    assert RF.classify(damaged, expected=cfg).state is RF.RunState.RECOVERABLE

    summary = R.train(cfg, damaged)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "cannot be read" in r.getMessage()
    ]
    assert len(warned) == 1 and str(last) in warned[0] and str(ckpts / "step=0000020.ckpt") in warned[0]
    assert summary["train_steps"] == 30
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 30  # rewritten whole
    assert metric_rows(damaged) == metric_rows(straight)  # history kept, the rows after step 20 not doubled
    assert read_curve(damaged / RF.METRICS) == read_curve(straight / RF.METRICS)


def test_no_readable_checkpoint_is_one_line_and_keeps_the_history(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *micro_args(tmp_path, steps=20)]
    assert tlit(args) == 0
    (out / RF.SUMMARY).unlink()
    metrics = (out / RF.METRICS).read_bytes()
    for ckpt in (out / RF.CKPT_DIR).glob("*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert tlit(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no checkpoint is readable" in err and f"delete {out / RF.CKPT_DIR}" in err
    assert (out / RF.METRICS).read_bytes() == metrics


def test_a_failed_resume_keeps_metrics_csv(tmp_path, capsys):
    """A last.ckpt that is a whole zip (the cheap check passes) but not a checkpoint: resume fails in one line
    when torch.load verifies it, and neither metrics.csv nor the file is touched."""
    out = tmp_path / "run"
    cfg = micro(tmp_path, steps=10)
    R.plan(out, cfg, RF.RunInfo())
    (out / RF.METRICS).write_text("epoch,step,train/loss,val/ppl\n0,4,5.6,\n0,9,,147.0\n")
    metrics = (out / RF.METRICS).read_bytes()
    (out / RF.CKPT_DIR).mkdir()
    torch.save({"anything": torch.zeros(3)}, out / RF.CKPT_DIR / RF.LAST_CKPT)
    with pytest.raises(RF.RunFolderConflict, match="no checkpoint is readable"):
        resume_checkpoint(out)
    assert tlit(["train", "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint is readable" in err
    assert (out / RF.METRICS).read_bytes() == metrics


class _DieAfterSave(Checkpoint):
    """A kill at the worst moment: right after the checkpoint of step ``at`` is saved, before Lightning logs
    that step's training row (it logs after every callback's ``on_train_batch_end``; checkpoint callbacks run
    last, this one after ``StepCheckpoint``)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise _Killed


class _Killed(Exception):
    pass


def test_a_kill_between_a_checkpoint_and_its_row_loses_no_row(tmp_path):
    """The training row of step 29 is due in the same optimizer step that saves step=0000030.ckpt (not a
    validation step). A kill between the two must not lose the row: the resumed run starts after it."""
    cfg = C.apply_overrides(C.base(), micro_args(tmp_path, steps=40))  # validates at step 40 only
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    R.train(cfg, straight)
    with pytest.raises(_Killed):
        R.train(cfg, killed, callbacks=[_DieAfterSave(at=30)])
    assert resume_checkpoint(killed)[1] == 30
    R.train(cfg, killed)
    assert 29 in [step for step, _, _ in metric_rows(straight)]
    assert metric_rows(killed) == metric_rows(straight)
    # the row written ahead is the row Lightning logs: a run that never checkpoints mid-way has the same file
    unsaved = tmp_path / "unsaved"
    R.train(C.apply_overrides(cfg, ["train.checkpoint_every_n_steps=1000"]), unsaved)
    assert (unsaved / RF.METRICS).read_text() == (straight / RF.METRICS).read_text()


# ----------------------------------------------------------------------------------------------------------
# A full disk


class _FillDisk(L.Callback):
    """Before the checkpoint of step ``at`` is written, fill the filesystem so that only half a checkpoint
    fits (callbacks run before Lightning's ModelCheckpoint)."""

    def __init__(self, at: int, filler: Path) -> None:
        self.at, self.filler = at, filler

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            ckpt = self.filler.parent / RF.CKPT_DIR / RF.LAST_CKPT
            st = os.statvfs(self.filler.parent)
            room = st.f_bavail * st.f_frsize - ckpt.stat().st_size // 2
            with self.filler.open("wb") as f:
                f.write(b"\0" * max(0, room))


def test_full_disk_never_leaves_a_truncated_checkpoint_and_the_rerun_resumes(tmp_path, small_disk):
    """The probe of issue 12: the disk fills while a checkpoint is written. The save fails, the attempt
    fails, the checkpoint under the name is the earlier, whole one, and no temporary file is left; once
    space is freed the rerun resumes from it and finishes with the whole learning curve."""
    cfg = micro(tmp_path, steps=30)
    run_dir = small_disk / "run"
    filler = run_dir / "filler"
    with pytest.raises(Exception, match=r"(?i)no space|write failed|file write") as failure:
        R.train(cfg, run_dir, callbacks=[_FillDisk(at=20, filler=filler)])
    assert "Traceback" not in str(failure.value).splitlines()[0]
    ckpts = run_dir / RF.CKPT_DIR
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [RF.LAST_CKPT, "step=0000010.ckpt", RF.TOKENIZER], names  # no .tmp, no step 20
    last = torch.load(ckpts / RF.LAST_CKPT, map_location="cpu", weights_only=True)
    assert last["global_step"] == 10
    assert RF.classify(run_dir, expected=cfg).state is RF.RunState.INTERRUPTED

    filler.unlink()
    summary = R.train(cfg, run_dir)
    assert summary["train_steps"] == 30
    val_steps = [step for step, _, ppl in metric_rows(run_dir) if ppl]
    assert val_steps == [9, 19, 29, 30], val_steps  # each validation once: before and after the failure
