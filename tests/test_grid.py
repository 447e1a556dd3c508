"""Grid files: rows are deltas from base, scales shrink them, every ablations/ YAML loads, bad files fail."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments.grids import grid as G
from experiments.grids.scale import SIZE_FIELDS, Scale, ScaleError
from experiments.tables.build import CELLS
from transformer_lit import config as C

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "reference" / "table3_paper.csv"


def test_table3_rows_match_the_paper():
    grid = G.load_grid("table3")
    expected = [
        "base",
        "A1",
        "A2",
        "A3",
        "A4",
        "B1",
        "B2",
        *[f"C{i}" for i in range(1, 8)],
        "D1",
        "D2",
        "D3",
        "D4",
        "E",
        "big",
    ]
    assert list(grid.rows) == expected
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} not present")
    cols = {("train_steps" if col == "steps" else col): key for col, key in CELLS.items()}
    for rec in csv.DictReader(PAPER.open()):
        cfg = grid.config(rec["row"], "paper")
        flat = {
            **{k: getattr(cfg.model, k.split(".")[1]) for k in cols.values() if k.startswith("model.")},
            "optim.label_smoothing": cfg.optim.label_smoothing,
            "train.max_steps": cfg.train.max_steps,
        }
        for col, key in cols.items():
            want = rec[col]
            got = flat[key]
            assert str(got) == want or float(got) == float(want) if col != "positional" else got == want, (
                rec["row"],
                col,
                got,
                want,
            )


def test_tiny_scale_divides_dims_and_keeps_meaning():
    grid = G.load_grid("table3")
    base = grid.config("base", "tiny")
    assert (base.model.d_model, base.model.d_ff, base.model.d_k, base.model.d_v) == (64, 256, 8, 8)
    assert base.model.num_heads == 8 and base.model.num_layers == 6 and base.model.dropout == 0.1
    b1 = grid.config("B1", "tiny")
    assert (b1.model.d_k, b1.model.d_v, b1.model.num_heads) == (2, 8, 8)
    big = grid.config("big", "tiny")
    assert big.train.max_steps == 3 * base.train.max_steps == 2100
    assert big.model.num_heads == 16 and big.model.d_model == 128
    assert base.data.corpus == "synthetic"


def test_one_scale_rule_for_grids_and_sweeps_and_its_inverse():
    """Grid rows, sweep choices and exported sweep rows all go through ``Scale``: a paper-size row taken
    to any shipped scale and back is the row again, and a sweep's choices shrink as grid cells do."""
    grid = G.load_grid("table3")
    paper = grid.config("big", "paper")
    for name, scale in grid.scales.items():
        scaled = grid.config("big", name)
        assert scaled == scale.apply(C.apply_overrides(C.base(), {**scale.set, **grid.row("big").cells}))
        flat, flat_paper = C.flat_dict(scaled), C.flat_dict(paper)
        for key in (*SIZE_FIELDS, "train.max_steps"):
            assert scale.choices(key, (flat_paper[key],)) == (flat[key],)
        for key in SIZE_FIELDS:
            assert scale.invert(key, flat[key]) == flat_paper[key]
    tiny = grid.scale("tiny")
    assert tiny.range("model.d_k", 8, 128, None) == (1, 16, None)
    assert tiny.range("model.d_k", 9, 127, 16) == (2, 15, 2)  # bounds inwards, step divided
    with pytest.raises(ScaleError, match="model.d_k=20 is not divisible by the scale's divide=8"):
        tiny.value("model.d_k", 20)
    with pytest.raises(ScaleError, match="empty at scale tiny"):
        tiny.range("model.d_k", 1, 7, None)
    with pytest.raises(ScaleError, match="steps must be a positive number"):
        Scale("x", steps=0)


def test_expand_rows_seeds_and_overrides(tmp_path):
    grid = G.load_grid("table3")
    specs = G.expand(
        grid, "tiny", rows=["A1", "E"], seeds=2, overrides={"train.max_steps": 7}, runs_root=tmp_path
    )
    assert [s.name for s in specs] == [
        "table3/tiny/A1/seed0",
        "table3/tiny/A1/seed1",
        "table3/tiny/E/seed0",
        "table3/tiny/E/seed1",
    ]
    assert all(s.config.train.max_steps == 7 for s in specs)
    assert specs[1].config.train.seed == 1
    assert specs[0].run_dir == tmp_path / "table3" / "tiny" / "A1" / "seed0"


def test_every_ablation_yaml_loads():
    files = [p for p in (ROOT / "ablations").glob("*.yaml") if p.name != "scales.yaml"]
    assert files
    for path in files:
        assert path.read_text().startswith("# tlit "), f"{path} must start with the command that runs it"
        grid = G.load_grid(path)
        for scale in grid.scales:
            assert G.expand(grid, scale)


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "scales.yaml").write_text((ROOT / "ablations" / "scales.yaml").read_text())
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: g\nrows:\n  r1: {model.d_kk: 3}\n", "row r1: unknown config field 'model.d_kk'"),
        (
            "name: g\nrows:\n  r1: {model.d_k: abc}\n",
            "row r1, scale paper: model.d_k must be an integer, got 'abc'",
        ),
        ("name: g\nrows:\n  r1: {model.dropout: 2}\n", "model.dropout must be in [0, 1), got 2.0"),
        ("name: g\nrows:\n  r1: {}\n  r1: {model.d_k: 3}\n", "name 'r1' used twice (line 4)"),
        ("name: g\nrowz: {}\n", "unknown top-level key 'rowz'"),
        ("name: g\nrows: {r1: {model.d_k: 20}}\n", "model.d_k=20 is not divisible by the scale's divide=8"),
        (
            "name: g\nscales: {s: {notes: 3}}\nrows: {r1: {}}\n",
            "scale s: notes must be a list of strings, got 3",
        ),
    ],
)
def test_malformed_grid_fails_with_one_line(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(G.GridError) as err:
        G.load_grid(path)
    assert message in str(err.value), str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_scale_builds_on_another_through_a_yaml_merge_key(tmp_path):
    """The shipped tiny-long scale is tiny's settings plus a finite training set and 3x the steps; a key
    set next to the merge overrides the merged one, and a key written twice by hand is still refused."""
    grid = G.load_grid("table3")
    tiny, long = grid.config("base", "tiny"), grid.config("base", "tiny-long")
    assert long.data.synthetic_pairs == 3000 and tiny.data.synthetic_pairs == 30000
    assert long.train.max_steps == 3 * tiny.train.max_steps
    assert grid.config("big", "tiny-long").train.max_steps == 3 * long.train.max_steps
    assert C.apply_overrides(long, {"data.synthetic_pairs": 30000, "train.max_steps": 700}) == tiny

    body = """
name: g
scales:
  a: {divide: 2, set: &a {data.vocab_size: 500, optim.warmup_steps: 10}}
  b: {divide: 2, set: {<<: *a, optim.warmup_steps: 20}}
rows: {r1: {}}
"""
    merged = G.load_grid(_write(tmp_path, body)).config("r1", "b")
    assert (merged.data.vocab_size, merged.optim.warmup_steps) == (500, 20)
    twice = body.replace("optim.warmup_steps: 20}", "optim.warmup_steps: 20, optim.warmup_steps: 30}")
    with pytest.raises(G.GridError, match="name 'optim.warmup_steps' used twice"):
        G.load_grid(_write(tmp_path, twice))


def test_unknown_grid_row_scale():
    with pytest.raises(G.GridError, match="grids in .*table3"):
        G.load_grid("tabel3")
    grid = G.load_grid("table3")
    with pytest.raises(G.GridError, match="unknown row 'Z9'; rows are: base, A1"):
        grid.row("Z9")
    with pytest.raises(G.GridError, match="unknown scale 'huge'; scales are: paper, small, tiny, tiny-long"):
        grid.scale("huge")
