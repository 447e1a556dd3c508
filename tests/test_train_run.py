"""`tlit train` end to end: the run folder, idempotence, resume after SIGKILL, NaN handling, config errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from experiments.cli import main as tlit
from experiments.runs import run as R
from experiments.runs.folder import RunInfo
from experiments.tables.sources import read_curve
from transformer_lit import config as C
from transformer_lit.errors import NonFiniteLossError

MICRO = [
    "model.num_layers=1",
    "model.d_model=32",
    "model.d_ff=64",
    "model.d_k=8",
    "model.d_v=8",
    "model.num_heads=4",
    "data.synthetic_pairs=400",
    "data.synthetic_eval_pairs=40",
    "data.vocab_size=200",
    "data.max_tokens=400",
    "optim.warmup_steps=20",
    "train.val_every_n_steps=40",
    "train.checkpoint_every_n_steps=10",
    "train.log_every_n_steps=5",
    "train.wandb=false",
    "train.progress_bar=false",
    "train.num_threads=1",
    "eval.beam_size=2",
    "eval.max_sentences=10",
]


def micro_args(tmp_path: Path, steps: int = 40) -> list[str]:
    return [*MICRO, f"train.max_steps={steps}", f"data.cache_dir={tmp_path / 'cache'}"]


def cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        **kw,
    )


def metric_rows(run_dir: Path) -> list[tuple[str, ...]]:
    """Every row of metrics.csv as written, but its epoch (Lightning's epoch counter at the final validation
    differs after a resume; the steps and values must not)."""
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [tuple(v for k, v in row.items() if k != "epoch") for row in csv.DictReader(fh)]


def val_losses(run_dir: Path) -> list[float]:
    import pandas as pd

    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame["val/loss"].dropna().tolist()


def test_run_folder_contract_and_rerun_is_a_noop(tmp_path, capsys):
    out = tmp_path / "run"
    assert tlit(["train", "--out", str(out), *micro_args(tmp_path, steps=20)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "grid",
        "scale",
        "row",
        "seed",
        "params",
        "ppl_dev",
        "bleu_dev",
        "bleu_dev_tok",
        "sacrebleu_signature",
        "train_steps",
        "train_tokens",
        "wall_seconds",
        "tokens_per_second",
        "device",
        "git_sha",
        "versions",
        "status",
    ):
        assert key in summary, key
    assert summary["train_steps"] == 20 and summary["status"] == "complete" and summary["train_tokens"] > 0
    assert summary["sacrebleu_signature"].startswith("nrefs:1|case:mixed")
    assert C.load_yaml(out / "config.yaml").train.max_steps == 20
    assert (out / "checkpoints" / "last.ckpt").is_file() and (
        out / "checkpoints" / "tokenizer.model"
    ).is_file()
    assert len((out / "hyps_dev.txt").read_text().splitlines()) == 40
    assert "val/ppl" in (out / "metrics.csv").read_text().splitlines()[0]
    # checkpoints load with weights_only=True
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 20
    capsys.readouterr()
    mtime = (out / "summary.json").stat().st_mtime
    assert tlit(["train", "--out", str(out), *micro_args(tmp_path, steps=20)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "summary.json").stat().st_mtime == mtime
    # a finished run answers only for its own config (issue 12): another dropout is refused in one line
    assert tlit(["train", "--out", str(out), *micro_args(tmp_path, steps=20), "model.dropout=0.3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (model.dropout: 0.1 there, 0.3 now)" in err
    assert err.count("\n") == 1 and (out / "summary.json").stat().st_mtime == mtime


def test_other_config_in_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    C.dump_yaml(C.base(), out / "config.yaml")
    assert tlit(["train", "--out", str(out), *micro_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("model.d_k=0", "model.d_k must be a positive integer, got 0"),
        ("model.dropout=-0.1", "model.dropout must be in [0, 1), got -0.1"),
        ("model.positional=rotary", "model.positional must be one of sinusoidal, learned"),
        ("optim.label_smoothing=1.5", "optim.label_smoothing must be in [0, 1), got 1.5"),
        ("model.headz=3", "unknown config field model.headz"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, capsys, arg, message):
    out = tmp_path / "run"
    assert tlit(["train", "--out", str(out), arg]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


class _Poison(L.Callback):
    """Turns the weights into NaN before optimizer step ``at`` so the loss becomes NaN there."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(module.model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = C.apply_overrides(C.base(), micro_args(tmp_path, steps=40))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at step 15"):
        R.train(cfg, out, callbacks=[_Poison(at=15)])
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step=*.ckpt"))
    assert ckpts == ["step=0000010.ckpt"]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_sigkill_and_rerun_continues_to_the_same_result(tmp_path):
    """On CPU with a fixed seed, a run killed after a checkpoint and resumed ends exactly where an
    uninterrupted run ends (same dev loss)."""
    args = micro_args(tmp_path, steps=40)
    straight = tmp_path / "straight"
    bin_dir = tmp_path / "bin"  # an `srun` on PATH, as on every SLURM node
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    proc = cli(["--out", str(straight), *args], env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "srun" not in out  # Lightning's hint is muted: our SLURM tasks start DDP without srun on purpose

    killed = tmp_path / "killed"
    proc = cli(["--out", str(killed), *args])
    target = killed / "checkpoints" / "step=0000020.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    # checkpoints appear whole (temp name, then rename); any moment after one exists is a fair kill, and a
    # fast machine may otherwise finish the 40 steps before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    proc = cli(["--out", str(killed), *args])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["train_steps"] == a["train_steps"] == 40
    assert b["ppl_dev"] == pytest.approx(a["ppl_dev"], rel=1e-9, abs=0)
    assert val_losses(killed)[-1] == pytest.approx(val_losses(straight)[-1], rel=1e-9, abs=0)
    # metrics.csv holds the whole run once (issue 12): the rows before the kill are kept, the rows the killed
    # attempt logged after its checkpoint are replaced, not doubled; the table's curve is the whole run's
    assert metric_rows(killed) == metric_rows(straight)
    assert read_curve(killed / "metrics.csv") == read_curve(straight / "metrics.csv") != []


def test_runtime_fields_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    cfg = C.apply_overrides(C.base(), micro_args(tmp_path, steps=3))
    R.check_or_write_config(out, cfg)
    moved = C.apply_overrides(
        cfg, {"train.num_threads": 2, "train.progress_bar": True, "train.accelerator": "cpu"}
    )
    R.check_or_write_config(out, moved)  # where/how it runs may change...
    assert C.load_yaml(out / "config.yaml").train.num_threads == 2
    with pytest.raises(R.RunFolderConflict, match=r"model.d_k: 8 there, 4 now"):
        R.check_or_write_config(out, C.apply_overrides(cfg, {"model.d_k": 4}))  # ...what it computes may not


def test_a_planned_run_takes_run_time_overrides_only(tmp_path, capsys):
    """``tlit train --run-dir``: the launchers' child command. It reads the planned config.yaml; an override
    that would change the run, a flag that would resolve another one, or an unplanned folder fail in one
    line (exit 2) before any work."""
    out = tmp_path / "run"
    assert tlit(["train", "--run-dir", str(out)]) == 2
    assert f"{out} has no config.yaml" in capsys.readouterr().err
    cfg = C.apply_overrides(C.base(), micro_args(tmp_path, steps=3))
    R.plan(out, cfg, RunInfo(grid="g", scale="s", row="r"))
    assert R.planned(out, ["train.num_threads=2"]) == (
        C.apply_overrides(cfg, {"train.num_threads": 2}),
        RunInfo(grid="g", scale="s", row="r"),
    )
    assert tlit(["train", "--run-dir", str(out), "model.d_k=4"]) == 2
    err = capsys.readouterr().err
    assert "model.d_k would change the planned run" in err and err.count("\n") == 1
    assert tlit(["train", "--run-dir", str(out), "--row", "B1"]) == 2
    assert "--row cannot be given with it" in capsys.readouterr().err
    assert C.load_yaml(out / "config.yaml") == cfg and not (out / "checkpoints").exists()


def test_compile_and_loss_chunking_never_make_another_config(tmp_path):
    out = tmp_path / "run"
    cfg = C.apply_overrides(C.base(), micro_args(tmp_path, steps=3))
    R.check_or_write_config(out, cfg)
    R.check_or_write_config(
        out, C.apply_overrides(cfg, ["train.compile=true", "train.loss_chunk_tokens=null"])
    )
    assert C.load_yaml(out / "config.yaml").train.compile is True


@pytest.mark.slow
def test_compile_trains_a_few_steps_and_logs_its_compile_time(tmp_path, caplog):
    """torch.compile works on CPU too (inductor's C++ backend; ~30 s to compile even this micro model)."""
    cfg = C.apply_overrides(C.base(), [*micro_args(tmp_path, steps=3), "train.compile=true"])
    with caplog.at_level("INFO", logger="transformer_lit"):
        summary = R.train(cfg, tmp_path / "run")
    assert summary["status"] == "complete" and summary["train_steps"] == 3
    assert re.search(
        r"torch.compile: the first training step took \d+\.\d s, compilation included", caplog.text
    )


def test_a_locked_run_is_not_trained_twice(tmp_path, capsys, monkeypatch):
    from experiments.runs.locks import RunLock

    monkeypatch.delenv("TLIT_RUN_LOCK_HELD", raising=False)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(out)
        lock.acquire()
        info = json.loads(lock.path.read_text())
        lock.path.write_text(
            json.dumps({**info, "pid": holder.pid, "proc_start": None})
        )  # a live other holder
        assert tlit(["train", "--out", str(out), *micro_args(tmp_path, steps=3)]) == 2
        assert "is being run by" in capsys.readouterr().err
        assert not (out / "summary.json").exists()
    finally:
        holder.kill()


def test_wandb_offline_run_is_logged_into_the_run_folder(tmp_path, monkeypatch):
    """Real W&B in offline mode (no server exists here): one W&B run per run folder, the same id after a
    resume, files that `wandb sync` can upload later."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = [a for a in micro_args(tmp_path, steps=4) if not a.startswith("train.wandb")]
    assert tlit(["train", "--out", str(out), "--row", "B1", *args, "train.wandb=true"]) == 0
    run_id = (out / "wandb_id.txt").read_text().strip()
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["row"] == "B1"
