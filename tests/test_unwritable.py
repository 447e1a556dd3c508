"""Unwritable paths are one line naming the path, never a traceback, and stop a command before its work
(issue 12, "Should fix"): a file where a folder belongs, and a read-only filesystem (a real read-only tmpfs:
as root, chmod does not stop writes). A full disk: tests/test_checkpoint_io.py, tests/test_failure_reasons.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import cli
from tests.conftest import tmpfs
from tests.test_sweep import write_sweep
from tests.test_tables import FIXTURES, GRID

TINY = ["train.max_steps=2", "data.synthetic_pairs=300", "data.synthetic_eval_pairs=20", "model.num_layers=1"]


@pytest.fixture()
def read_only(tmp_path):
    """A read-only filesystem (as root, chmod does not stop writes)."""
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


def commands(bad: Path, tmp_path: Path) -> list[list[str]]:
    sweep = str(write_sweep(tmp_path, trials=1))
    return [
        ["train", "--runs", str(bad), *TINY],
        ["train", "--out", str(bad / "run"), *TINY],
        ["grid", "run", "table3", "--rows", "C1", "--devices", "cpu:1", "--runs", str(bad), *TINY],
        ["sweep", sweep, "--runs", str(bad)],
        ["sweep", sweep, "--sweeps", str(bad)],
        ["table", GRID, "--runs", str(FIXTURES), "--out", str(bad), "--no-plots"],
        ["data", "prepare", f"data.cache_dir={bad}", *TINY],
    ]


def check_one_line(args: list[str], bad: Path, why: tuple[str, ...], capsys) -> None:
    assert cli.main(args) == 2, args
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"tlit {args[0]}: error: ") and str(bad) in err and any(w in err for w in why), (
        args,
        captured.err,
    )
    assert "Traceback" not in captured.err + captured.out, args
    assert "data ready" not in captured.out, args  # stopped before the data was prepared


def test_a_file_where_a_folder_belongs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "afile"
    bad.write_text("not a folder")
    for args in commands(bad, tmp_path):  # mkdir says "File exists" of the file itself: said plainly
        check_one_line(args, bad, ("Not a directory", "a file is there, where a folder belongs"), capsys)
    assert bad.read_text() == "not a folder"


def test_a_read_only_filesystem(tmp_path, read_only, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in commands(read_only, tmp_path):
        check_one_line(args, read_only, ("Read-only file system",), capsys)
