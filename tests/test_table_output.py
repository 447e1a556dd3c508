"""``tlit table`` writing its outputs: it never replaces a table that holds complete runs the new one lacks
unless ``--force`` (issue 12, must-fix 4: an empty ``--runs`` replaced the committed table with "missing"
rows and exited 0; later a held-out seed set, as many runs, replaced the shipped 3-seed table),
every output of one call is written or none, and an unwritable ``--out`` is one line naming the path.

The fixture runs (tests/fixtures/runs, see test_tables.py) hold 10 complete runs.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "runs"
GRID = str(HERE / "fixtures" / "grids" / "table3.yaml")
STEM = "table3-tiny"


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES, tmp_path / "runs"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def table(runs: Path, out: Path, *extra: str) -> int:
    return main(["table", GRID, "--runs", str(runs), "--out", str(out), *extra])


def test_losing_complete_runs_needs_force(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    assert table(runs, out) == 0
    before = snapshot(out)
    assert f"{STEM}-curves.png" in before
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert table(empty, out) == 2  # the probe: an empty --runs
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tlit table: error: {out / (STEM + '.csv')} holds 10 complete runs that the new table "
        f"(from {empty}) lacks, e.g. A1 seed 0; pass --force to replace it"
    )
    assert snapshot(out) == before  # nothing replaced, plots included

    fewer = tmp_path / "fewer"
    shutil.copytree(runs, fewer)
    shutil.rmtree(fewer / "table3" / "tiny" / "A1")  # a different --runs: 8 of the 10
    assert table(fewer, out) == 2
    assert "holds 2 complete runs that the new table (from" in capsys.readouterr().err
    assert snapshot(out) == before

    other = tmp_path / "other"  # as many runs, but other ones: A1's two seeds, not base's
    assert table(fewer, other) == 0
    others = tmp_path / "others"
    shutil.copytree(runs, others)
    shutil.rmtree(others / "table3" / "tiny" / "base")
    capsys.readouterr()
    assert table(others, other) == 2  # the old guard counted runs only, and let this through
    err = capsys.readouterr().err
    assert f"holds 2 complete runs that the new table (from {others}) lacks, e.g. base seed 0;" in err

    assert table(empty, out, "--force") == 0
    after = snapshot(out)
    assert f"{STEM}-curves.png" not in after  # no curves now: the stale plot goes, not left behind
    assert "| A1 | h=1 |" in after[f"{STEM}.md"].decode() and "missing" in after[f"{STEM}.md"].decode()
    assert not [n for n in after if n.endswith(".tmp")]

    assert table(runs, out) == 0  # more complete runs than the file holds: no --force needed
    assert f"{STEM}-curves.png" in snapshot(out)


def test_every_output_or_none(runs: Path, tmp_path: Path) -> None:
    """A write that fails half-way (here the files may not exceed 40 kB, as on a nearly full disk: the
    Markdown and CSV fit, the plots do not) leaves the earlier table whole and one line naming the file."""
    out = tmp_path / "results"
    fewer = tmp_path / "fewer"
    shutil.copytree(runs, fewer)
    shutil.rmtree(fewer / "table3" / "tiny" / "A1")
    assert table(fewer, out) == 0
    before = snapshot(out)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    argv = [sys.executable, "-m", "experiments.cli", "table", GRID, "--runs", str(runs), "--out", str(out)]
    done = subprocess.run(
        argv, capture_output=True, text=True, cwd=HERE.parent, preexec_fn=small_files, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tlit table: error: {out}/{STEM}-") and last.endswith(
        ".png: File too large; no output was replaced"
    ), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert snapshot(out) == before  # the Markdown and CSV were written to temporary files only


def test_unwritable_out_is_one_line(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    assert table(runs, blocker / "results", "--no-plots") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tlit table: error: {blocker / 'results'}: Not a directory", err
