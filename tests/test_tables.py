"""``tlit table``: golden tables from fixture run folders, seed statistics, agreement with the paper worked
out by hand, bad inputs, run states, the W&B source (runs logged offline, the API mocked), parity of the
fast paired bootstrap with sacreBLEU's, no torch import, and the command end to end.

Fixture runs (tests/fixtures/runs/table3/tiny, written by hand): base and A1 with two seeds; A3, C7, D3, big
one seed; B1 seed0 complete + seed1 failed; C1 interrupted (config and checkpoints only); D1 a truncated
summary.json; D3 a truncated metrics.csv; C7 a summary without bleu_dev_tok; E a summary of another grid;
X1 a row that is not in the grid file; the other rows are missing. base, A1, A3 and B1 keep dev outputs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from experiments.cli import main
from experiments.grids.grid import load_grid
from experiments.runs.locks import RunLock
from experiments.tables import build as tables
from experiments.tables import sources, stats

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "runs"
GOLDEN = HERE / "golden"
REFRESH = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_tables.py"
GRID = str(HERE / "fixtures" / "grids" / "table3.yaml")  # a frozen copy: recalibrating a scale keeps goldens


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    """A copy of the fixture runs (the table writes its p-value cache beside them)."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "runs"))


def fixture_table(runs: Path) -> tables.Table:
    grid = load_grid(GRID)
    return tables.build_table(grid, "tiny", sources.collect_folder_runs(grid, "tiny", runs))


def line(table: tables.Table, row: str) -> pd.Series:
    return table.frame.set_index("row").loc[row]


# ----------------------------------------------------------------------------------------------------------
# Golden files


@pytest.mark.parametrize("fmt", ["md", "csv"])
def test_golden_table(runs: Path, tmp_path: Path, fmt: str) -> None:
    result = tables.make_table(GRID, scale="tiny", runs_root=runs, out=tmp_path / "out", plots=False)
    got = (tmp_path / "out" / f"table3-tiny.{fmt}").read_text()
    golden = GOLDEN / f"table3-tiny.{fmt}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got)
    assert golden.is_file(), f"{golden} missing; create it on purpose with {REFRESH}"
    assert got == golden.read_text(), (
        f"table3-tiny.{fmt} differs from {golden}; if the change is intended, refresh with {REFRESH} "
        "and review the diff"
    )
    assert fmt != "md" or got == result.markdown


def test_latex_escapes_and_keeps_every_row(runs: Path) -> None:
    tex = tables.render_latex(fixture_table(runs))
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex and r"$d_{model}$" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert len(body.strip().splitlines()) == 21  # 20 grid rows + X1
    assert "summary.json" in body and "summary\\_json" not in body and "NonFiniteLossError" in body


# ----------------------------------------------------------------------------------------------------------
# Seed statistics, paper columns, cells


def test_mean_std_and_seed_count(runs: Path) -> None:
    table = fixture_table(runs)
    base, a1 = line(table, "base"), line(table, "A1")
    # base: PPL 3.12 and 3.18 -> mean 3.15, sample std sqrt(2 * 0.03^2 / 1) = 0.042426
    assert base["ppl_dev"] == pytest.approx(3.15) and base["ppl_dev_std"] == pytest.approx(
        0.0424264, abs=1e-6
    )
    # A1: BLEU 35.2 and 36.0 -> mean 35.6, std sqrt(2 * 0.4^2) = 0.565685
    assert a1["bleu_dev"] == pytest.approx(35.6) and a1["bleu_dev_std"] == pytest.approx(0.565685, abs=1e-6)
    assert (base["seeds"], a1["seeds"], line(table, "A3")["seeds"]) == (2, 2, 1)
    assert math.isnan(line(table, "A3")["ppl_dev_std"])  # one seed: no std, shown without "±"
    assert a1["d_ppl"] == pytest.approx(3.58 - 3.15) and a1["paper_d_ppl"] == pytest.approx(5.29 - 4.92)
    assert a1["ppl_same_way"] == "yes" and a1["paper_params_m"] != a1["paper_params_m"]  # NaN: not in paper
    header, rows = tables.display_rows(table)
    cells = dict(zip(header, rows[[r[0] for r in rows].index("A1")], strict=False))
    assert (cells["h"], cells["d_k"], cells["N"], cells["PPL (dev)"]) == ("1", "64", "", "3.58 ± 0.04")
    assert dict(zip(header, rows[0], strict=False))["N"] == "6"  # base shows every cell, like the paper


def test_agreement_and_spearman_by_hand() -> None:
    # ours vs the paper's dev PPL; deltas from each base (5.00 and 4.92):
    #   A1 +0.50 / +0.37 same way; A3 -0.10 / -0.01 paper moved < 0.05, not counted; B1 -0.10 / +0.24 differs;
    #   D3 -0.30 / -0.25 same way; D2 +0.20 / +0.03 not counted; C2 (no run of ours) / +0.27 not counted.
    # -> 2 of 3 rows go the paper's way, B1 does not.
    rows = ["base", "A1", "A3", "B1", "D3", "D2", "C2"]
    ours = [5.00, 5.50, 4.90, 4.90, 4.70, 5.20, math.nan]
    paper = [4.92, 5.29, 4.91, 5.16, 4.67, 4.95, 5.19]
    frame = pd.DataFrame(
        {
            "row": rows,
            "ppl_dev": ours,
            "paper_ppl": paper,
            "bleu_dev_tok": math.nan,
            "paper_bleu": math.nan,
        }
    )
    frame = stats.add_agreement(frame, "base")
    assert list(frame["ppl_same_way"]) == ["", "yes", "", "no", "yes", "", ""]
    assert "in 2 of 3 rows where the paper's moved by at least 0.05 (not in B1)" in stats._agreement_line(
        frame, "dev PPL", "ppl"
    )
    # Spearman over the 6 rows with both: ranks (ties averaged)
    #   ours  D3 1, A3 2.5, B1 2.5, base 4, D2 5, A1 6;  paper  D3 1, A3 2, base 3, D2 4, B1 5, A1 6
    #   deviations from 3.5: ours (.5, 2.5, -1, -1, -2.5, 1.5), paper (-.5, 2.5, -1.5, 1.5, -2.5, .5)
    #   rho = sum(products) / sqrt(sum sq * sum sq) = 13 / sqrt(17 * 17.5) = 0.753703
    assert stats.spearman(ours, paper) == pytest.approx(13 / math.sqrt(17 * 17.5))
    # no ties: ranks (2, 3, 1, 4) vs (2, 4, 1, 3), sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert stats.spearman([5.0, 6.0, 4.0, 7.0], [4.9, 5.3, 4.8, 5.1]) == pytest.approx(0.8)
    assert math.isnan(stats.spearman([1.0, 2.0], [1.0, 2.0]))


def test_bleu_agreement_compares_tokenized_bleu_with_the_papers() -> None:
    """The paper's BLEU is tokenized and compound-split: our change is bleu_dev_tok's, not sacreBLEU's.
    A1: sacreBLEU 40.0 -> 41.0 (+1.0), tokenized 30.0 -> 29.0 (-1.0), the paper's 25.8 -> 24.9 (-0.9): the
    same way (tokenized), though sacreBLEU went the other way. A2: tokenized +0.5, the paper's -0.3: not."""
    frame = pd.DataFrame(
        {
            "row": ["base", "A1", "A2"],
            "ppl_dev": math.nan,
            "paper_ppl": math.nan,
            "bleu_dev": [40.0, 41.0, 39.0],
            "bleu_dev_tok": [30.0, 29.0, 30.5],
            "paper_bleu": [25.8, 24.9, 25.5],
        }
    )
    frame = stats.add_agreement(frame, "base")
    assert list(frame["d_bleu_tok"].fillna(0)) == pytest.approx([0, -1.0, 0.5])
    assert list(frame["bleu_same_way"]) == ["", "yes", "no"]
    assert stats._agreement_line(frame, "dev BLEU", "bleu").startswith(
        "dev BLEU moved the same way as the paper's in 1 of 2 rows"
    )


def test_summary_lines_of_fixture(runs: Path) -> None:
    lines = fixture_table(runs).lines
    assert (
        lines[0]
        == "runs: 10 complete, 1 interrupted, 1 failed, 1 conflict, 1 corrupt, 28 missing (21 rows x 2 seeds)"
    )
    assert any(s.startswith("Spearman correlation of dev PPL with the paper's over 7 rows") for s in lines)
    assert any("p < 0.05 in 1 of 3 rows" in s for s in lines)


def test_scale_notes_close_the_table(runs: Path, tmp_path: Path) -> None:
    """A scale's ``notes`` (what its regime can and cannot show) are the table's last lines."""
    grids = Path(shutil.copytree(Path(GRID).parent, tmp_path / "grids"))
    scales = grids / "scales.yaml"
    notes = ["tiny regime: what it shows.", "What it cannot show."]
    raw = yaml.safe_load(scales.read_text())
    raw["tiny"]["notes"] = notes
    scales.write_text(yaml.safe_dump(raw))
    grid = load_grid(grids / "table3.yaml")
    table = tables.build_table(grid, "tiny", sources.collect_folder_runs(grid, "tiny", runs))
    assert table.lines[-2:] == notes
    markdown = tables.render_markdown(table)
    assert markdown.count("\n- tiny regime: what it shows.\n- What it cannot show.\n") == 1


def test_training_flops_and_devices_by_hand() -> None:
    from transformer_lit import config as C

    cfg = C.flat_dict(C.base())  # the paper's base, V = 37000, one billion target tokens
    # per layer pair: encoder 3,152,384 + decoder 4,204,032 parameters; x6 = 44,138,496
    # forward per token: 2 * 44,138,496 + 2 * 512 * 37000 + 6 * 6 * 32 * 8 * (64 + 64) = 127,344,640
    assert stats.training_flops(cfg, {"vocab_size": 37000}, 1e9) == 3 * 127_344_640 * 1e9
    assert math.isnan(stats.training_flops({**cfg, "model.d_k": "x"}, {}, 1e9))
    assert stats.device_count({"device": "4x NVIDIA H100 80GB HBM3"}, cfg) == 4
    assert stats.device_count({"device": "cpu (1 threads) x2"}, cfg) == 2
    assert stats.device_count({}, {"train.devices": 3}) == 3


# ----------------------------------------------------------------------------------------------------------
# Bad inputs and run states


def test_bad_inputs_are_notes_and_warnings(runs: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = fixture_table(runs)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for path, what in (
        ("D1/seed0/summary.json", "not valid JSON"),
        ("E/seed0/summary.json", "another run"),
        ("C7/seed0/summary.json", "lacks bleu_dev_tok"),
        ("D3/seed0/metrics.csv", "line 13"),
        ("tiny/X1", "not in the grid file"),
    ):
        assert any(path in m and what in m for m in warned.splitlines()), (path, warned)
    assert line(table, "D1")["status"] == "1 corrupt, 1 missing" and line(table, "D1")["seeds"] == 0
    assert "belongs to another run (grid=table3_wmt" in line(table, "E")["notes"]
    c7, d3 = line(table, "C7"), line(table, "D3")
    assert c7["status"].startswith("1 complete") and math.isnan(c7["bleu_dev_tok"]) and c7["ppl_dev"] == 2.95
    assert d3["ppl_dev"] == 2.90 and "truncated" in d3["notes"]  # the table keeps the run, the note says why
    assert line(table, "X1")["notes"].startswith("not in the grid file")


def test_states_missing_failed_incomplete(runs: Path) -> None:
    table = fixture_table(runs)
    assert line(table, "A2")["status"] == "missing" and line(table, "A2")["seeds"] == 0
    assert (
        line(table, "B1")["status"] == "1 complete, 1 failed"
        and "NonFiniteLossError" in line(table, "B1")["notes"]
    )
    assert line(table, "C1")["status"] == "1 interrupted, 1 missing"
    assert line(table, "big")["notes"] == "seed0: trained 3000 of 3600 steps; seed1: no run folder"
    assert len(table.frame) == 21


def _record(run_dir: Path, row: str = "base", seed: int = 0) -> sources.RunRecord:
    grid = load_grid(GRID)
    return sources.read_run_folder(run_dir, grid, "tiny", row, seed)


def test_locks_running_interrupted_and_more_corruptions(tmp_path: Path) -> None:
    run_dir = tmp_path / "table3" / "tiny" / "base" / "seed0"
    run_dir.mkdir(parents=True)
    assert _record(run_dir).status == "pending"
    (run_dir / "failed.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    lock = RunLock(run_dir)
    assert lock.acquire()
    assert _record(run_dir).status == "running"  # a live lock: a retry after the failure is running
    lock.release()
    (run_dir / "failed.json").unlink()
    dead = subprocess.Popen(["true"])  # a pid that just died
    dead.wait()
    (run_dir / "run.lock").write_text(
        json.dumps({"pid": dead.pid, "hostname": os.uname().nodename, "started": 0.0})
    )
    rec = _record(run_dir)
    assert rec.status == "interrupted" and rec.notes[0].startswith("stale run.lock")
    (run_dir / "run.lock").write_text(json.dumps({"pid": 1, "hostname": "other-node", "started": 0.0}))
    assert _record(run_dir).status == "running"  # another host's fresh lock is trusted
    (run_dir / "run.lock").unlink()
    for text, note in (("[]", "not a JSON object"), ('{"ppl_dev": "abc"}', "ppl_dev is 'abc', not a number")):
        (run_dir / "summary.json").write_text(text)
        assert note in "; ".join(_record(run_dir).notes)
    (run_dir / "summary.json").write_text(
        json.dumps({"grid": "table3", "scale": "tiny", "row": "base", "seed": 1})
    )
    assert _record(run_dir).status == "conflict"  # seed1's summary in seed0's folder
    (run_dir / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage")
    (run_dir / "config.yaml").write_text("model: [unclosed")
    notes = "; ".join(_record(run_dir).notes)
    assert "metrics.csv: unreadable" in notes and "config.yaml is unreadable" in notes


def test_curve_keeps_the_last_value_of_a_repeated_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/loss,val/ppl\n0,199,2.0,,\n0,199,,1.5,4.5\n0,399,,1.2,3.3\n"
        "0,199,,1.4,4.1\n0,599,,1."
    )
    curve, problem = sources.read_curve(path)
    assert curve == [(199, 4.1), (399, 3.3)] and "line 6 has 4 fields" in problem


# ----------------------------------------------------------------------------------------------------------
# Significance


def test_paired_bootstrap_many_equals_sacrebleu_pairwise() -> None:
    from transformer_lit.metrics import paired_bootstrap

    refs = [
        f"the {w} cat sat on the {v} mat ." for w in ("red", "big", "old", "shy") for v in ("new", "blue")
    ]
    base = [r.replace("cat", "dog") if i % 3 == 0 else r for i, r in enumerate(refs)]
    systems = {
        "near": [r.replace("mat", "rug") if i % 4 == 0 else r for i, r in enumerate(refs)],
        "far": [" ".join(r.split()[:4]) for r in refs],
        "same": list(base),
    }
    fast = stats.paired_bootstrap_many(base, systems, refs, n=200, seed=7)
    assert fast == {name: paired_bootstrap(base, hyps, refs, n=200, seed=7) for name, hyps in systems.items()}
    assert fast["same"] == 1.0 and fast["far"] < 0.05


def test_p_values_are_cached(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = load_grid(GRID)
    cache = runs / "cache.json"
    first = tables.build_table(grid, "tiny", sources.collect_folder_runs(grid, "tiny", runs), cache=cache)
    assert cache.is_file() and len(json.loads(cache.read_text())) == 3

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached p-value")

    monkeypatch.setattr(stats, "paired_bootstrap_many", boom)
    again = tables.build_table(grid, "tiny", sources.collect_folder_runs(grid, "tiny", runs), cache=cache)
    pd.testing.assert_series_equal(first.frame["p_bleu"], again.frame["p_bleu"])


# ----------------------------------------------------------------------------------------------------------
# W&B


class FakeSummary(dict):
    """Like wandb's HTTPSummary: keys() and [] (it is not a dict there)."""


def fake_run(
    config: dict, summary: dict, state: str = "finished", history: list | None = None
) -> SimpleNamespace:
    return SimpleNamespace(
        id=f"id-{config['row']}",
        path=["me", "tlit", f"id-{config['row']}"],
        config=config,
        summary=FakeSummary(summary),
        job_type=config["row"],
        group="table3/tiny",
        state=state,
        history=lambda keys, pandas: history or [],
    )


def mock_wandb_api(monkeypatch: pytest.MonkeyPatch, runs: list[SimpleNamespace]) -> list[tuple]:
    wandb = pytest.importorskip("wandb")
    calls = []

    class FakeApi:  # the signature of wandb.Api.runs (0.31)
        def runs(
            self, path=None, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True
        ):
            calls.append((path, filters, lazy))
            return [r for r in runs if r.group == filters["group"]]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    return calls


def _summary(row: str, seed: int, ppl: float, bleu: float) -> dict:
    return {
        "grid": "table3",
        "scale": "tiny",
        "row": row,
        "seed": seed,
        "params": 764416,
        "vocab_size": 1000,
        "ppl_dev": ppl,
        "bleu_dev": bleu,
        "bleu_dev_tok": bleu + 1,
        "train_steps": 1200,
        "train_tokens": 1_080_000,
        "wall_seconds": 48.0,
        "device": "cpu (1 threads) x1",
        "status": "complete",
    }


def test_wandb_source_with_mocked_api(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {
        "grid": "table3",
        "scale": "tiny",
        "model.d_model": 64,
        "model.d_ff": 256,
        "model.d_k": 8,
        "model.d_v": 8,
        "train.max_steps": 1200,
    }
    runs = [
        fake_run(
            {**cfg, "row": "base", "train.seed": 0},
            _summary("base", 0, 3.1, 41.0),
            history=[{"trainer/global_step": 199, "val/ppl": 9.0}, {"_step": 3, "val/ppl": None}],
        ),
        fake_run({**cfg, "row": "base", "train.seed": 1}, _summary("base", 1, 3.3, 40.0)),
        fake_run(
            {**cfg, "row": "A1", "model.num_heads": 1, "model.d_k": 64, "model.d_v": 64, "train.seed": 0},
            _summary("A1", 0, 3.6, 35.0),
        ),
        fake_run({**cfg, "row": "B1", "model.d_k": 2, "train.seed": 0}, {}, state="crashed"),
        fake_run({**cfg, "row": "C1", "model.num_layers": 2, "train.seed": 0}, {}, state="running"),
        fake_run({**cfg, "row": "D3", "train.seed": 0}, _summary("D2", 0, 3.0, 40.0)),  # wrong row
    ]
    calls = mock_wandb_api(monkeypatch, runs)
    grid = load_grid(GRID)
    records = sources.collect_wandb_runs(grid, "tiny", "me/tlit")
    assert calls == [("me/tlit", {"group": "table3/tiny"}, False)]  # one query, not one per run
    table = tables.build_table(grid, "tiny", records, significance=False)
    assert line(table, "base")["ppl_dev"] == pytest.approx(3.2) and line(table, "base")["seeds"] == 2
    assert line(table, "A1")["d_ppl"] == pytest.approx(0.4) and line(table, "A1")["ppl_same_way"] == "yes"
    assert (
        line(table, "B1")["status"].startswith("1 failed")
        and "W&B state crashed" in line(table, "B1")["notes"]
    )
    assert line(table, "C1")["status"].startswith("1 running") and line(table, "D3")["status"].startswith(
        "1 conflict"
    )
    assert line(table, "C2")["status"] == "missing"
    base_run = next(r for r in records if r.row == "base" and r.seed == 0)
    assert base_run.curve() == [(199, 9.0)]
    with pytest.raises(sources.TableSourceError, match="--wandb must be ENTITY/PROJECT, got 'nope'"):
        sources.collect_wandb_runs(grid, "tiny", "nope")


def _read_wandb_file(path: Path) -> list:
    """Records of an offline ``run-*.wandb`` file (W&B's leveldb-style log of protobuf Records): wandb 0.31
    writes no wandb-summary.json or config.yaml offline (issue #9646) and has no reader for it."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    if data[:4] != b":W&B":
        pytest.skip(f"unknown W&B offline format in {path}")
    records, pos, chunk, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _run_from_records(records: list) -> SimpleNamespace:
    def items(updates: object) -> dict:
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    config, summary, history, state = {}, {}, [], "running"
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            group, job_type = rec.run.run_group, rec.run.job_type
            config.update(items(rec.run.config.update))
        elif kind == "summary":
            summary.update(items(rec.summary.update))
        elif kind == "history":
            history.append(items(rec.history.item))
        elif kind == "exit":
            state = "finished" if rec.exit.exit_code == 0 else "failed"
    run = fake_run(config, summary, state=state, history=history)
    run.group, run.job_type = group, job_type
    return run


def test_wandb_runs_logged_offline_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    for var, value in (
        ("WANDB_MODE", "offline"),
        ("WANDB_SILENT", "true"),
        ("WANDB_DIR", str(tmp_path)),
        ("WANDB_CONFIG_DIR", str(tmp_path)),
        ("WANDB_CACHE_DIR", str(tmp_path)),
    ):
        monkeypatch.setenv(var, value)
    from transformer_lit import config as C

    grid = load_grid(GRID)
    for row, ppl, bleu in (("base", 3.1, 41.0), ("A1", 3.6, 35.0)):  # what experiments/trainer.py logs
        flat = C.flat_dict(grid.config(row, "tiny", 0)) | {"grid": "table3", "scale": "tiny", "row": row}
        run = wandb.init(
            project="transformer_lit",
            dir=str(tmp_path),
            group="table3/tiny",
            job_type=row,
            config=flat,
            mode="offline",
        )
        run.log({"val/ppl": ppl * 3, "trainer/global_step": 199})
        run.summary.update(_summary(row, 0, ppl, bleu))
        run.finish()
    wandb.teardown()
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, list(tmp_path.rglob("*"))
    mock_wandb_api(monkeypatch, [_run_from_records(_read_wandb_file(f)) for f in files])
    table = tables.build_table(
        grid, "tiny", sources.collect_wandb_runs(grid, "tiny", "me/tlit"), significance=False
    )
    assert (
        line(table, "A1")["ppl_dev"] == 3.6 and line(table, "A1")["h"] == 1 and line(table, "A1")["d_k"] == 64
    )
    assert line(table, "A1")["d_bleu_tok"] == pytest.approx(-6.0) and line(table, "B1")["status"] == "missing"
    assert [r.curve() for r in table.records if r.row == "base"] == [[(199, pytest.approx(9.3))]]


# ----------------------------------------------------------------------------------------------------------
# Boundaries and the command


def test_tables_import_no_torch(runs: Path, tmp_path: Path) -> None:
    code = (
        "import sys; import experiments.tables.plots; from experiments.tables.build import make_table; "
        f"make_table('table3', scale='tiny', runs_root={str(runs)!r}, out={str(tmp_path)!r}, plots=False); "
        "bad = [m for m in ('torch', 'lightning', 'wandb') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_end_to_end(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog) -> None:
    out = tmp_path / "out"
    assert main(["table", GRID, "--runs", str(runs), "--out", str(out), "--format", "md,csv"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("# table3 at scale tiny") and "| A1 | h=1 |" in printed.out
    assert f"wrote {out / 'table3-tiny.md'}" in printed.err
    assert "D1/seed0/summary.json: summary.json is not valid JSON" in caplog.text  # on stderr outside pytest
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "table3-tiny-curves.png",
        "table3-tiny-ppl-change.png",
        "table3-tiny-ppl-vs-params.png",
        "table3-tiny.csv",
        "table3-tiny.md",
    ]
    assert "![table3-tiny-curves.png](table3-tiny-curves.png)" in (out / "table3-tiny.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table", "nosuchgrid"], "grid 'nosuchgrid' not found; grids in"),
        (["table", GRID, "--scale", "huge"], "unknown scale 'huge'; scales are: paper, small, tiny"),
        (
            ["table", "table3", "--format", "md,pdf"],
            "--format must be a comma list of md, csv, tex; got 'pdf'",
        ),
    ],
)
def test_cli_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
