"""Where a result table's runs come from: run folders (the record) or W&B (a sink that may hold the same).

Both sources give one :class:`RunRecord` per run, with its status and the problems met reading it, so that a
table shows every run of the grid, never silently dropped: a run folder's state comes from
``experiments.runs.folder.classify`` (the states ``tlit grid status`` shows), and a row without any run is
"missing". A bad file (a truncated summary, garbage metrics, a folder holding another grid's run) gives a
warning naming the file and a note on that run; the rest of the table is still built. No torch import:
``tlit table`` must stay fast.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.grids.grid import Grid
from experiments.runs import folder as RF
from transformer_lit import config as C

log = logging.getLogger(__name__)

METRIC_FIELDS = (
    "params",
    "ppl_dev",
    "bleu_dev",
    "bleu_dev_tok",
    "train_steps",
    "train_tokens",
    "wall_seconds",
)
MISSING = "missing"
"""A grid row with no run at all (no folder, no W&B run)."""
STATUSES = (*(s.value for s in RF.RunState), MISSING)
Curve = list[tuple[int, float]]  # (step, dev PPL)


class TableSourceError(ValueError):
    """The runs could not be listed at all (bad --wandb path, W&B unreachable); one line."""


@dataclass
class RunRecord:
    """One run of a grid row, as read from its folder or W&B.

    ``status``: a ``folder.RunState`` value, or "missing". Only complete runs enter means; the others are
    shown with their status and notes.
    """

    row: str
    seed: int | None
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # flat ``{"model.d_k": 64, ...}``, defaults filled in
    notes: list[str] = field(default_factory=list)
    path: Path | None = None  # the run folder (None for W&B runs)
    curve_loader: Callable[[], Curve] | None = None

    def note(self, text: str, where: str | Path) -> None:
        """A problem with this run: logged as a warning naming the file, and kept for the notes column."""
        log.warning("%s: %s", where, text)
        self.notes.append(text)

    def metric(self, name: str) -> float:
        return _as_float(self.summary.get(name))

    def curve(self) -> Curve:
        return self.curve_loader() if self.curve_loader else []


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def flat_config(values: dict[str, Any]) -> dict[str, Any]:
    """Base defaults overlaid with a run's values, nested (config.yaml) or flat (W&B), unvalidated."""
    flat = C.flat_dict(C.base())
    for key, value in values.items():
        if isinstance(value, dict) and key in C.SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in value.items() if f"{key}.{k}" in flat})
        elif key in flat:
            flat[key] = value["value"] if isinstance(value, dict) and "value" in value else value
    return flat


def check_metrics(rec: RunRecord, summary: dict[str, Any], where: str | Path) -> None:
    """Notes on a summary's metrics: missing ones, and ones that are not numbers (they read as NaN)."""
    missing = [k for k in (*RF.IDENTITY_FIELDS, *METRIC_FIELDS) if k not in summary]
    if missing:
        rec.note(f"summary lacks {', '.join(missing)}", where)
    for name in METRIC_FIELDS:
        value = summary.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            rec.note(f"{name} is {value!r}, not a number", where)


# ----------------------------------------------------------------------------------------------------------
# Run folders


def collect_folder_runs(grid: Grid, scale: str, runs_root: str | Path) -> list[RunRecord]:
    """Every ``<runs>/<grid>/<scale>/<row>/seed<k>/`` folder, and a "missing" record per row without any."""
    grid.scale(scale)
    root = Path(runs_root) / grid.name / scale
    records: list[RunRecord] = []
    if not root.is_dir():
        have = Path(runs_root) / grid.name
        scales = sorted(p.name for p in have.iterdir() if p.is_dir()) if have.is_dir() else []
        log.warning("%s: no run folders (scales with runs: %s)", root, ", ".join(scales) or "none")
    else:
        for row_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for seed_dir in sorted(p for p in row_dir.iterdir() if p.is_dir()):
                match = re.fullmatch(r"seed(\d+)", seed_dir.name)
                if not match:
                    log.warning("%s: not a run folder (expected seed<k>); skipped", seed_dir)
                    continue
                records.append(read_run_folder(seed_dir, grid, scale, row_dir.name, int(match.group(1))))
    seen = {r.row for r in records}
    records += [RunRecord(row=row, seed=None, status=MISSING) for row in grid.rows if row not in seen]
    for row in sorted(seen - set(grid.rows)):
        log.warning("%s: row %s is not in the grid file %s", root / row, row, grid.path)
    return records


def read_run_folder(run_dir: Path, grid: Grid, scale: str, row: str, seed: int) -> RunRecord:
    """Status, summary, config and learning curve of one run folder; problems become notes, never errors.

    The run must be what its place says: its summary names this grid, scale, row and seed, and its config
    has the row's own cells (``model.num_layers: 2`` for C1). Other fields may differ (a corpus given on
    the command line applies to the whole grid, not to the row's label)."""
    identity = {"grid": grid.name, "scale": scale, "row": row, "seed": seed}
    status = RF.classify(run_dir, expected=row_cells(grid, row, scale, seed), identity=identity)
    rec = RunRecord(row=row, seed=seed, status=status.state.value, path=run_dir)
    if status.where is not None:
        rec.note(status.detail, status.where)
    elif status.detail and status.state is not RF.RunState.COMPLETE:
        rec.notes.append(status.detail)
    if status.summary is not None:
        if status.state is RF.RunState.COMPLETE:
            rec.summary = status.summary
        check_metrics(rec, status.summary, run_dir / RF.SUMMARY)
    if status.config is not None:
        rec.config = C.flat_dict(status.config)
    metrics_path = run_dir / RF.METRICS
    if metrics_path.is_file():
        curve, problem = read_curve(metrics_path)
        if problem:
            rec.note(f"{RF.METRICS}: {problem}", metrics_path)
        rec.curve_loader = lambda: curve
    return rec


def row_cells(grid: Grid, row: str, scale: str, seed: int) -> dict[str, Any]:
    """The fields a grid row sets, as the scale resolves them (``{"model.num_layers": 2}`` for C1), except
    ``train.*``: how long and where a run trains is the scale's and the command line's (``big``'s step count
    moves with every scale and ``train.max_steps=N`` shortens a whole grid), not what the row ablates."""
    cells = grid.rows[row].cells if row in grid.rows else {}  # a row not in the grid: warned about elsewhere
    cells = {k: v for k, v in cells.items() if not k.startswith("train.")}
    if not cells:
        return {}
    flat = C.flat_dict(grid.config(row, scale, seed))
    return {k: flat[k] for k in cells}


def read_curve(path: Path) -> tuple[Curve, str]:
    """(step, dev PPL) points of a Lightning CSVLogger file, and a problem description ("" when clean).

    A truncated last line (a run killed while writing) is dropped with a note; a resumed run that logged a
    step twice keeps the later value.
    """
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return [], f"unreadable ({err})"
    if not rows or "step" not in rows[0] or "val/ppl" not in rows[0]:
        return [], "no step and val/ppl columns"
    header = rows[0]
    i_step, i_ppl = header.index("step"), header.index("val/ppl")
    points: dict[int, float] = {}
    problem = ""
    for lineno, values in enumerate(rows[1:], start=2):
        if len(values) != len(header):
            problem = f"line {lineno} has {len(values)} fields, expected {len(header)} (truncated?)"
            continue
        if not values[i_ppl]:
            continue
        try:
            points[int(float(values[i_step]))] = float(values[i_ppl])
        except ValueError:
            problem = f"line {lineno}: step {values[i_step]!r}, val/ppl {values[i_ppl]!r} are not numbers"
    return sorted(points.items()), problem


def read_lines(path: Path) -> list[str] | None:
    """One sentence per line, split on "\\n" only (``splitlines`` would also split at U+2028 inside a
    sentence and misalign hypotheses with references); None when the file is absent or unreadable."""
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


# ----------------------------------------------------------------------------------------------------------
# Weights & Biases


WANDB_STATES = {
    "finished": RF.RunState.COMPLETE,
    "running": RF.RunState.RUNNING,
    "pending": RF.RunState.PENDING,
    "crashed": RF.RunState.FAILED,
    "failed": RF.RunState.FAILED,
    "killed": RF.RunState.FAILED,
    "preempted": RF.RunState.INTERRUPTED,
    "preempting": RF.RunState.RUNNING,
}


def collect_wandb_runs(grid: Grid, scale: str, path: str) -> list[RunRecord]:
    """Runs of W&B group ``<grid>/<scale>`` in ``ENTITY/PROJECT`` (W&B summary = the run's summary, flat
    config)."""
    grid.scale(scale)
    if not re.fullmatch(r"[^/\s]+/[^/\s]+", path or ""):
        raise TableSourceError(f"--wandb must be ENTITY/PROJECT, got {path!r}")
    import wandb  # lazy: ~0.5 s, and only this source needs it

    group = f"{grid.name}/{scale}"
    try:
        api = wandb.Api()
        # lazy=False: one query for all runs, instead of one more per run when its config is first read
        eager = {"lazy": False} if "lazy" in inspect.signature(api.runs).parameters else {}
        runs = list(api.runs(path, filters={"group": group}, **eager))
    except Exception as err:  # noqa: BLE001 - any failure here (network, auth, no such project) is the user's
        raise TableSourceError(f"W&B {path}: could not list the runs of group {group}: {err}") from None
    chosen: dict[tuple[str, int | None], RunRecord] = {}
    for run in runs:
        rec = wandb_record(run, grid.name, scale)
        key = (rec.row, rec.seed)
        if key in chosen:  # a rerun under a new W&B id: a complete run wins, else the first one listed
            complete = RF.RunState.COMPLETE.value
            keep = rec if rec.status == complete and chosen[key].status != complete else chosen[key]
            keep.note("another W&B run of this row and seed was ignored", _wandb_where(run))
            chosen[key] = keep
        else:
            chosen[key] = rec
    records = list(chosen.values())
    seen = {r.row for r in records}
    records += [RunRecord(row=row, seed=None, status=MISSING) for row in grid.rows if row not in seen]
    if not runs:
        log.warning("wandb:%s: no runs in group %s", path, group)
    return records


def wandb_record(run: Any, grid: str, scale: str) -> RunRecord:
    where = _wandb_where(run)
    raw_config = dict(run.config or {})
    config = flat_config(raw_config)
    summary = {k: run.summary[k] for k in run.summary.keys()}  # noqa: SIM118 - W&B summaries are not dicts
    row = str(raw_config.get("row") or summary.get("row") or run.job_type or "?")
    seed_value = summary.get("seed", raw_config.get("train.seed"))
    seed = None if math.isnan(_as_float(seed_value)) else int(seed_value)
    state = WANDB_STATES.get(str(run.state).lower(), RF.RunState.CORRUPT)
    rec = RunRecord(row=row, seed=seed, status=state.value, config=config)
    if state is RF.RunState.CORRUPT:
        rec.note(f"unknown W&B state {run.state!r}", where)
    elif state is RF.RunState.COMPLETE:
        check_wandb_summary(rec, summary, {"grid": grid, "scale": scale, "row": row, "seed": seed}, where)
    elif state is RF.RunState.FAILED:
        rec.notes.append(f"W&B state {run.state}")
    rec.curve_loader = lambda: _wandb_curve(run, where)
    return rec


def check_wandb_summary(
    rec: RunRecord, summary: dict[str, Any], identity: dict[str, Any], where: str
) -> None:
    """A finished W&B run's summary: another run's makes it a conflict; bad metrics become notes."""
    wrong = [k for k in RF.IDENTITY_FIELDS if k in summary and summary[k] != identity[k]]
    if wrong:
        rec.status = RF.RunState.CONFLICT.value
        said = " ".join(f"{k}={summary.get(k)}" for k in RF.IDENTITY_FIELDS)
        rec.note(f"belongs to another run ({said})", where)
        return
    rec.summary = summary
    check_metrics(rec, summary, where)


def _wandb_where(run: Any) -> str:
    path = getattr(run, "path", None)
    return "wandb:" + (
        "/".join(map(str, path)) if isinstance(path, list | tuple) else str(getattr(run, "id", "?"))
    )


def _wandb_curve(run: Any, where: str) -> Curve:
    """Dev PPL against Lightning's ``trainer/global_step`` (W&B's own ``_step`` counts log calls)."""
    try:
        rows = run.history(keys=["val/ppl", "trainer/global_step"], pandas=False)
    except Exception as err:  # noqa: BLE001 - a curve is optional; the table does not need it
        log.warning("%s: no learning curve (%s)", where, err)
        return []
    points = {}
    for r in rows:
        step = r.get("trainer/global_step", r.get("_step"))
        if step is not None and r.get("val/ppl") is not None:
            points[int(step)] = float(r["val/ppl"])
    return sorted(points.items())
