"""The command line explains itself (issue 12, "CLI"): ``tlit train --help`` lists every config field with
its type, allowed values, default and docstring (read from transformer_lit/config.py, the one place they
are written), ``--seed`` and the overrides have help, and ``tlit train --no-wandb`` exists as for grids."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

from experiments import cli
from transformer_lit import config as C

ROOT = Path(__file__).resolve().parents[1]


def train_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "COLUMNS": "120"},
    ).stdout
    return " ".join(out.split())  # argparse wraps at the terminal's width


def test_train_help_lists_every_field_with_type_default_and_docstring():
    text = train_help()
    for section, cls in C.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} (" in text, f"{section}.{f.name} missing from tlit train --help"
    assert (
        "model.positional (sinusoidal|learned, default sinusoidal) Sinusoidal encodings (Section 3.5)" in text
    )
    assert "model.num_heads (int, default 8) h: attention heads." in text
    assert "optim.tokens_per_update (int|null, default null) Target tokens per optimizer step" in text
    assert "train.wandb (bool, default true)" in text and "train.seed (int, default 0)" in text
    assert re.search(r"--seed SEED seed of initialisation, dropout and batch order", text), text
    assert "section.field=value config overrides section.field=value, any number" in text


def test_every_field_has_a_docstring():
    undocumented = [f.key for f in C.field_help() if not f.doc]
    assert not undocumented, f"give these fields a docstring in transformer_lit/config.py: {undocumented}"


def test_overrides_and_seed_have_help_in_every_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "sweep"):
        actions = {a.dest: a for a in sub[name]._actions}
        assert actions["overrides"].help, name
    grid = next(a for a in sub["grid"]._actions if a.dest == "grid_cmd").choices
    for name in ("run", "plan"):
        assert {a.dest: a for a in grid[name]._actions}["overrides"].help, name


def test_train_no_wandb(tmp_path, capsys):
    """The probe: ``tlit train --no-wandb`` was "unrecognized arguments" (grid run and sweep had it)."""
    from tests.test_train_run import micro_args

    out = tmp_path / "run"
    args = [a for a in micro_args(tmp_path, steps=2) if not a.startswith("train.wandb")]
    assert cli.main(["train", "--out", str(out), "--no-wandb", *args]) == 0, capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["wandb"] is False
    assert not (out / "wandb").exists()
