"""The run folder (experiments/runs/folder.py): one classifier behind `tlit grid status` and `tlit table`,
the atomic writer, and the states issue 12 needs (other config, corrupt files, damaged last checkpoint)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from experiments.cli import main as tlit
from experiments.grids import grid as G
from experiments.runs import folder as RF
from experiments.runs.locks import RunLock
from transformer_lit import atomic
from transformer_lit import config as C

TABLE3 = G.load_grid("table3")


def _config(run_dir: Path, row: str, **changes) -> None:
    cfg = C.apply_overrides(TABLE3.config(row, "tiny", 0), changes)
    RF.write_config(run_dir, cfg)


def _summary(run_dir: Path, row: str, **changes) -> None:
    summary = {"grid": "table3", "scale": "tiny", "row": row, "seed": 0, "status": "complete"}
    summary |= {"params": 1, "ppl_dev": 5.0, "bleu_dev": 20.0, "bleu_dev_tok": 21.0, "train_steps": 10}
    summary |= {"train_tokens": 100, "wall_seconds": 3.0}
    RF.write_json_atomic(run_dir / RF.SUMMARY, summary | changes)


def _ckpt(path: Path, step: int, whole: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.w": torch.zeros(64, 64)}, "global_step": step}, path)
    if not whole:  # a full disk's truncated write
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def complete(d: Path, row: str) -> None:
    _config(d, row)
    _summary(d, row)


def running(d: Path, row: str) -> None:
    _config(d, row)
    assert RunLock(d).acquire()  # held by this (live) process; released with the tmp folder


def failed(d: Path, row: str) -> None:
    _config(d, row)
    RF.mark_failed(d, "NonFiniteLossError: nan at step 7")


def interrupted(d: Path, row: str) -> None:
    _config(d, row)
    (d / RF.LOG).write_text("step 10\n")
    _ckpt(d / RF.CKPT_DIR / RF.LAST_CKPT, 10)


def interrupted_stale_lock(d: Path, row: str) -> None:
    _config(d, row)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = {"pid": dead.pid, "hostname": os.uname().nodename, "started": 0.0}
    (d / RF.LOCK).write_text(json.dumps(lock))


def recoverable(d: Path, row: str) -> None:
    _config(d, row)
    _ckpt(d / RF.CKPT_DIR / "step=0000010.ckpt", 10)
    _ckpt(d / RF.CKPT_DIR / RF.LAST_CKPT, 20, whole=False)


def no_readable_checkpoint(d: Path, row: str) -> None:
    _config(d, row)
    _ckpt(d / RF.CKPT_DIR / "step=0000010.ckpt", 10, whole=False)
    _ckpt(d / RF.CKPT_DIR / RF.LAST_CKPT, 20, whole=False)


def pending(d: Path, row: str) -> None:
    d.mkdir(parents=True, exist_ok=True)  # an empty folder (no folder at all is "missing" to a table)


def pruned(d: Path, row: str) -> None:
    _config(d, row)
    RF.write_json_atomic(d / RF.PRUNED, {"status": "pruned", "train_steps": 5})


def other_config(d: Path, row: str) -> None:
    _config(d, row, **{"model.num_layers": 3})  # C1 is "N=2": a finished run of another config
    _summary(d, row)


def other_run(d: Path, row: str) -> None:
    _config(d, row)
    _summary(d, row, seed=1)  # seed1's summary in seed0's folder


def invalid_config(d: Path, row: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / RF.CONFIG).write_text(
        C.to_yaml(TABLE3.config(row, "tiny", 0)).replace("num_heads: 8", "num_heads: abc")
    )
    _summary(d, row)


def truncated_summary(d: Path, row: str) -> None:
    _config(d, row)
    (d / RF.SUMMARY).write_text('{"grid": "table3", "scale": "ti')


FIXTURES: list[tuple[str, Callable[[Path, str], None], RF.RunState]] = [
    ("base", complete, RF.RunState.COMPLETE),
    ("A1", running, RF.RunState.RUNNING),
    ("A2", failed, RF.RunState.FAILED),
    ("A3", interrupted, RF.RunState.INTERRUPTED),
    ("A4", interrupted_stale_lock, RF.RunState.INTERRUPTED),
    ("B1", recoverable, RF.RunState.RECOVERABLE),
    ("B2", pending, RF.RunState.PENDING),
    ("C1", other_config, RF.RunState.CONFLICT),
    ("C2", other_run, RF.RunState.CONFLICT),
    ("C3", invalid_config, RF.RunState.CORRUPT),
    ("C4", truncated_summary, RF.RunState.CORRUPT),
    ("C5", no_readable_checkpoint, RF.RunState.CORRUPT),
    ("C6", pruned, RF.RunState.PRUNED),
]


def test_grid_status_and_table_report_the_same_state_for_every_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    for row, build, _ in FIXTURES:
        build(G.run_dir_for(runs, "table3", "tiny", row, 0), row)
    rows = ",".join(row for row, _, _ in FIXTURES)

    assert tlit(["grid", "status", "table3", "--scale", "tiny", "--rows", rows, "--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_status = {line.split()[0].split("/")[2]: line.split()[1] for line in lines[1:-1]}
    table_args = ["--runs", str(runs), "--out", str(tmp_path / "out"), "--no-plots", "--format", "csv"]
    assert tlit(["table", "table3", "--scale", "tiny", *table_args]) == 0
    with (tmp_path / "out" / "table3-tiny.csv").open(newline="") as fh:
        by_table = {r["row"]: r["status"] for r in csv.DictReader(fh)}

    want = {row: state.value for row, _, state in FIXTURES}
    assert by_status == want
    assert {row: by_table[row] for row in want} == want  # one seed: the status column is the state itself


def test_details_name_the_problem_and_what_to_do(tmp_path):
    def status(build: Callable[[Path, str], None], row: str) -> RF.Status:
        d = tmp_path / row
        build(d, row)
        spec = {"grid": "table3", "scale": "tiny", "row": row, "seed": 0}
        return RF.classify(d, expected=TABLE3.config(row, "tiny", 0), identity=spec)

    s = status(recoverable, "B1")
    assert s.resume_from == tmp_path / "B1" / RF.CKPT_DIR / "step=0000010.ckpt"
    assert s.detail == "checkpoints/last.ckpt is unreadable; resumes from checkpoints/step=0000010.ckpt"
    s = status(other_config, "C1")
    assert s.refusal(tmp_path / "C1", "--runs") == (
        f"{tmp_path / 'C1'} holds a run with a different config (model.num_layers: 3 there, 2 now); "
        "use another --runs or delete that folder"
    )
    s = status(no_readable_checkpoint, "C5")
    assert s.refusal(tmp_path / "C5").endswith(
        f"delete {tmp_path / 'C5' / RF.CKPT_DIR} to train this run from the start"
    )
    s = status(invalid_config, "C3")
    assert "config.yaml is invalid: model.num_heads" in s.detail and s.where == tmp_path / "C3" / RF.CONFIG
    s = status(interrupted_stale_lock, "A4")
    assert s.detail.startswith("stale run.lock (pid ") and s.detail.endswith("no checkpoint yet: starts over")
    assert RF.classify(tmp_path / "absent").state is RF.RunState.PENDING


def test_grid_status_imports_neither_torch_nor_lightning(tmp_path):
    complete(G.run_dir_for(tmp_path, "table3", "tiny", "base", 0), "base")
    recoverable(G.run_dir_for(tmp_path, "table3", "tiny", "A1", 0), "A1")
    code = (
        "import sys; from experiments import cli; "
        f"rc = cli.main(['grid', 'status', 'table3', '--rows', 'base,A1', '--runs', {str(tmp_path)!r}]); "
        "assert not {'torch', 'lightning'} & set(sys.modules), 'imported torch or lightning'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "recoverable" in out.stdout


# ----------------------------------------------------------------------------------------------------------
# The atomic writer


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic.write_atomic(path, "old")

    def refuse(tmp: Path) -> None:
        assert tmp.read_text() == "new" and tmp.parent == path.parent
        raise OSError("verification failed")

    with pytest.raises(OSError, match="verification failed"), atomic.atomic_path(path, verify=refuse) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["f.json"]  # no temporary file left
    with pytest.raises(FileExistsError):
        atomic.write_atomic(path, "other", exclusive=True)
    assert path.read_text() == "old"
    atomic.write_atomic(path, b"new")
    assert path.read_text() == "new"


def test_write_atomic_all_writes_every_file_or_none(tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "missing" / "b.csv"  # b's folder does not exist: its write fails
    a.write_text("old")
    with pytest.raises(OSError, match=r"no output was replaced.*b\.csv"):
        atomic.write_atomic_all({a: b"new", b: b"new"})
    assert a.read_text() == "old" and os.listdir(tmp_path) == ["a.md"]
