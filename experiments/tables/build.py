"""``tlit table``: a grid's runs -> a table beside the paper's Table 3 (Markdown, CSV, LaTeX) and plots.

One line per grid row, in the grid's order (the paper's): the Table 3 cells where the row differs from base
(all of them for base, like the paper), our params, dev PPL, sacreBLEU and tokenized BLEU (mean ± std over
seeds, and the seed count), the paper's PPL, BLEU and params, the change of PPL and of tokenized BLEU (the
paper's kind) from our base next to the paper's change from its base and whether both go the same way, a
paired-bootstrap p-value of BLEU
against base, and the training cost (estimated FLOPs, measured device-hours). Runs that are missing, failed
or still running keep their line, with their status and notes. Sources: :mod:`experiments.tables.sources`;
significance, agreement and FLOPs: :mod:`experiments.tables.stats`; plots: :mod:`experiments.tables.plots`.
No torch import: for 21 rows x 3 seeds a fresh ``tlit table`` costs ~2.8 s of CPU on a first call (the
paired bootstrap) and ~1.7 s once its p-values are cached (``bench/tables_speed.py``).
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.grids.grid import Grid, GridError, load_grid
from experiments.runs import folder as RF
from experiments.tables import sources, stats

log = logging.getLogger(__name__)

BASE_ROW = "base"
FORMATS = ("md", "csv", "tex")
SIGNIFICANCE_CACHE = ".table-significance.json"
"""p-values of the paired bootstrap, kept in <runs>/<grid>/<scale>/ (git-ignored with the runs)."""
CELLS = {  # Table 3's columns -> config keys
    "N": "model.num_layers",
    "d_model": "model.d_model",
    "d_ff": "model.d_ff",
    "h": "model.num_heads",
    "d_k": "model.d_k",
    "d_v": "model.d_v",
    "P_drop": "model.dropout",
    "eps_ls": "optim.label_smoothing",
    "positional": "model.positional",
    "steps": "train.max_steps",
}
STATS = ("ppl_dev", "bleu_dev", "bleu_dev_tok")  # mean and std over seeds
PAPER = {"paper_ppl": "ppl_dev", "paper_bleu": "bleu_dev", "paper_params_m": "params_m"}  # ours <- the csv's
AGREEMENT = ("d_ppl", "paper_d_ppl", "ppl_same_way", "d_bleu_tok", "paper_d_bleu", "bleu_same_way")
COLUMNS = ["row", "label", "group", *CELLS, "params_m", *(f"{m}{s}" for m in STATS for s in ("", "_std"))]
COLUMNS += ["seeds", "seed_ids", *PAPER, *AGREEMENT, "p_bleu", "train_flops", "device_hours"]
COLUMNS += ["status", "notes"]
"""The CSV's columns, in the Markdown table's order (which shows a subset, formatted)."""
PAPER_NOTE = "paper: Vaswani et al. 2017, Table 3 (newstest2013, the paper's sizes; params x10^6)"


@dataclass
class Table:
    """A built table: ``frame`` (one line per row, numbers; the CSV) and the lines printed under it."""

    grid: str
    scale: str
    frame: pd.DataFrame
    lines: list[str]
    records: list[sources.RunRecord] = field(default_factory=list)


def paper_reference() -> pd.DataFrame:
    """The paper's Table 3 (kept in the package as data), indexed by row name."""
    text = importlib.resources.files("transformer_lit").joinpath("reference/table3_paper.csv").read_text()
    return pd.read_csv(io.StringIO(text), dtype={"row": str}).set_index("row")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1) over seeds; NaN for fewer than two."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return math.nan
    m = sum(finite) / len(finite)
    return math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))


def _row_config(grid: Grid, scale: str, row: str, records: list[sources.RunRecord]) -> dict[str, Any] | None:
    """The config a row ran with (a complete run's config.yaml first), else the grid's plan for it."""
    for rec in sorted(records, key=lambda r: r.status != RF.RunState.COMPLETE):
        if rec.config:
            return rec.config
    if row in grid.rows:
        from transformer_lit import config as C

        return C.flat_dict(grid.config(row, scale))
    return None


def _group(row: str, ref: pd.DataFrame) -> str:
    if row in ref.index:
        return str(ref.loc[row, "group"])
    match = re.fullmatch(r"([A-E])\d*", row)
    return match.group(1) if match else row


def _status(recs: list[sources.RunRecord], seeds: list[int]) -> str:
    counts = Counter(r.status for r in recs)
    counts[sources.MISSING] += len(set(seeds) - {r.seed for r in recs if r.seed is not None})
    counts = Counter({s: n for s, n in counts.items() if n})
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{counts[s]} {s}" for s in sources.STATUSES if counts.get(s))


def _notes(name: str, grid: Grid, recs: list[sources.RunRecord], seeds: list[int], extra: list[str]) -> str:
    notes = [] if name in grid.rows else ["not in the grid file"]
    for rec in sorted(recs, key=lambda r: -1 if r.seed is None else r.seed):
        if rec.notes:
            notes.append(("" if rec.seed is None else f"seed{rec.seed}: ") + "; ".join(rec.notes))
        steps, planned = rec.summary.get("train_steps"), (rec.config or {}).get("train.max_steps")
        stopped_early = isinstance(steps, int) and isinstance(planned, int) and steps < planned
        if rec.status == RF.RunState.COMPLETE and stopped_early:
            notes.append(f"seed{rec.seed}: trained {steps} of {planned} steps")
    present = {r.seed for r in recs}
    if any(r.status != sources.MISSING for r in recs):
        notes += [f"seed{k}: no run folder" for k in seeds if k not in present]
    return "; ".join([*notes, *extra])


def build_table(
    grid: Grid,
    scale: str,
    records: list[sources.RunRecord],
    *,
    significance: bool = True,
    cache: Path | None = None,
) -> Table:
    """Aggregate run records into the table's frame (seed means and stds, paper columns, deltas, p-values).

    ``cache``: where p-values of the paired bootstrap are kept between calls (None: not kept)."""
    ref = paper_reference()
    by_row: dict[str, list[sources.RunRecord]] = {}
    for rec in records:
        by_row.setdefault(rec.row, []).append(rec)
    order = [*grid.rows, *sorted(set(by_row) - set(grid.rows))]
    seeds = sorted({r.seed for r in records if r.seed is not None})
    p_values = stats.bleu_significance(by_row, BASE_ROW, cache=cache) if significance else {}
    lines = []
    for name in order:
        recs = by_row.get(name, [])
        done = [r for r in recs if r.status == RF.RunState.COMPLETE]
        cfg = _row_config(grid, scale, name, recs) or {}
        line: dict[str, Any] = {
            "row": name,
            "label": grid.rows[name].label if name in grid.rows else name,
            "group": _group(name, ref),
            **{col: cfg.get(key) for col, key in CELLS.items()},
            "params_m": _mean([r.metric("params") / 1e6 for r in done]),
        }
        for metric in STATS:
            values = [r.metric(metric) for r in done]
            line[metric], line[f"{metric}_std"] = _mean(values), _std(values)
        line["seeds"] = len(done)
        line["seed_ids"] = " ".join(str(k) for k in sorted({r.seed for r in done if r.seed is not None}))
        paper = ref.loc[name] if name in ref.index else None
        for ours, col in PAPER.items():
            line[ours] = float(paper[col]) if paper is not None and pd.notna(paper[col]) else math.nan
        p, p_note = p_values.get(name, (math.nan, ""))
        line["p_bleu"] = p
        line["train_flops"] = _mean(
            [stats.training_flops(r.config or cfg, r.summary, r.metric("train_tokens")) for r in done]
        )
        line["device_hours"] = _mean(
            [r.metric("wall_seconds") * stats.device_count(r.summary, r.config or cfg) / 3600 for r in done]
        )
        line["status"] = _status(recs, seeds)
        line["notes"] = _notes(name, grid, recs, seeds, [p_note] if p_note else [])
        lines.append(line)
    frame = pd.DataFrame(lines)
    frame = stats.add_agreement(frame, BASE_ROW)
    cols = [c for c in COLUMNS if c in frame.columns]
    footer = [*stats.summary_lines(frame, records, seeds), *grid.scale(scale).notes]
    return Table(grid.name, scale, frame[cols], footer, records)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = format(value, fmt)
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)  # 9.5e+17 -> 9.5e17


def _cell(col: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if col == "steps":
        return f"{value / 1000:g}K" if value >= 1000 and value % 100 == 0 else str(value)
    return str(value)  # 0.0, not 0: P_drop and eps_ls read like the paper


DISPLAY = (  # header, column, format: a format spec; "±" + spec: mean ± std; "+" + spec: signed; "s": text
    ("params (M)", "params_m", ".3g"),
    ("PPL (dev)", "ppl_dev", "±.2f"),
    ("BLEU (dev)", "bleu_dev", "±.1f"),
    ("BLEU tok", "bleu_dev_tok", "±.1f"),
    ("seeds", "seeds", "d"),
    ("paper PPL", "paper_ppl", ".2f"),
    ("paper BLEU", "paper_bleu", ".1f"),
    ("paper params", "paper_params_m", "g"),
    ("ΔPPL", "d_ppl", "+.2f"),
    ("paper ΔPPL", "paper_d_ppl", "+.2f"),
    ("PPL same way", "ppl_same_way", "s"),
    ("ΔBLEU tok", "d_bleu_tok", "+.1f"),
    ("paper ΔBLEU", "paper_d_bleu", "+.1f"),
    ("BLEU same way", "bleu_same_way", "s"),
    ("p (BLEU)", "p_bleu", ".3f"),
    ("train FLOPs", "train_flops", ".1e"),
    ("device-h", "device_hours", ".3g"),
    ("status", "status", "s"),
    ("notes", "notes", "s"),
)
TEXT_HEADERS = ("row", "label", "positional", "PPL same way", "BLEU same way", "status", "notes")


def display_rows(table: Table, pm: str = "±") -> tuple[list[str], list[list[str]]]:
    """Header and text cells for Markdown and LaTeX: cells equal to base's are left blank, as in the paper."""
    frame = table.frame
    base = frame[frame["row"] == BASE_ROW]
    base_cells = {col: base.iloc[0][col] for col in CELLS} if len(base) else {}
    header = ["row", "label", *CELLS, *(h for h, _, _ in DISPLAY)]

    def show(line: pd.Series, col: str, fmt: str) -> str:
        if fmt == "s":
            return str(line[col])
        if fmt.startswith("±"):
            mean, std = _num(line[col], fmt[1:]), _num(line[f"{col}_std"], fmt[1:])
            return f"{mean} {pm} {std}" if std else mean
        return _num(line[col], fmt)

    rows = []
    for _, line in frame.iterrows():
        show_all = line["row"] == BASE_ROW or not base_cells
        cells = [_cell(c, line[c]) if show_all or line[c] != base_cells[c] else "" for c in CELLS]
        rows.append([line["row"], line["label"], *cells, *(show(line, col, fmt) for _, col, fmt in DISPLAY)])
    return header, rows


def render_markdown(table: Table, images: list[str] | tuple[str, ...] = ()) -> str:
    header, rows = display_rows(table)

    def md(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    numeric = {i for i, h in enumerate(header) if h not in TEXT_HEADERS}
    out = [f"# {table.grid} at scale {table.scale}: dev PPL and BLEU beside the paper's Table 3", ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    out += ["", *[f"- {line}" for line in table.lines], f"- {PAPER_NOTE}"]
    if images:
        out += ["", *[f"![{name}]({name})" for name in images]]
    return "\n".join(out) + "\n"


def render_csv(table: Table) -> str:
    return table.frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


_TEX_ESCAPES = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}
_TEX_HEADER = {
    "N": "$N$",
    "d_model": "$d_{model}$",
    "d_ff": "$d_{ff}$",
    "h": "$h$",
    "d_k": "$d_k$",
    "d_v": "$d_v$",
    "P_drop": "$P_{drop}$",
    "eps_ls": r"$\epsilon_{ls}$",
    "positional": "pos.",
}


def _tex(text: str) -> str:
    text = "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def render_latex(table: Table) -> str:
    """A booktabs ``tabular`` (wrap it in ``table*`` / ``resizebox``); the summary lines as comments."""
    header, rows = display_rows(table)
    out = [f"% {table.grid} at scale {table.scale}; written by `tlit table`: regenerate, do not edit."]
    out += [f"% {line}" for line in [*table.lines, PAPER_NOTE]]
    out += [r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 4) + "ll}", r"\toprule"]
    out.append(" & ".join(_TEX_HEADER.get(h) or _tex(h) for h in header) + r" \\")
    out.append(r"\midrule")
    out += [" & ".join(_tex(c) for c in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The command


@dataclass
class TableResult:
    table: Table
    markdown: str
    files: list[Path]


class TableOverwriteError(ValueError):
    """The new table lacks complete runs that the file it would replace holds (``--force`` replaces it)."""


def parse_formats(formats: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    bad = [f for f in items if f not in FORMATS] or ([] if items else ["''"])
    if bad:
        raise ValueError(f"--format must be a comma list of {', '.join(FORMATS)}; got {bad[0]!r}")
    return items


def complete_runs(table: Table) -> set[tuple[str, int]]:
    """(row, seed) of every complete run in the table."""
    return _runs_of(table.frame)


def complete_runs_in_csv(path: Path) -> set[tuple[str, int]] | int | None:
    """The complete runs a table's CSV records: (row, seed) pairs from its ``seed_ids`` column, or only their
    number (``seeds`` of the rows whose status names a complete run) in a CSV written before that column;
    None when there is no such file. The Markdown is never parsed."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"row": str, "status": str, "seed_ids": str}, keep_default_na=False)
        if "seed_ids" in frame.columns:
            return _runs_of(frame)
        counted = frame["status"].str.contains(r"\bcomplete\b", regex=True)
        return int(frame.loc[counted, "seeds"].astype(int).sum())
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
        reason = " ".join(str(err).split())[:100]
        raise TableOverwriteError(
            f"{path}: cannot read its complete runs ({reason}); pass --force to replace it"
        ) from None


def _runs_of(frame: pd.DataFrame) -> set[tuple[str, int]]:
    """(row, seed) from the ``seed_ids`` column: text in the table's frame and in a CSV read as text."""
    pairs = zip(frame["row"], frame["seed_ids"], strict=True)
    return {(str(row), int(k)) for row, seeds in pairs for k in seeds.split()}


def check_overwrite(table: Table, csv_path: Path, source: str) -> None:
    """Refuse to replace a table that holds complete runs the new one lacks: an empty or wrong --runs, or
    the runs of other seeds (a held-out set built into the shipped folder), would otherwise replace
    committed results. A CSV from before the ``seed_ids`` column is compared by its number of runs."""
    old, new = complete_runs_in_csv(csv_path), complete_runs(table)
    if isinstance(old, int) and len(new) < old:
        raise TableOverwriteError(
            f"{csv_path} holds {old} complete runs, the new table only {len(new)} (from {source}); "
            "pass --force to replace it"
        )
    if isinstance(old, set) and (lost := sorted(old - new)):
        row, seed = lost[0]
        raise TableOverwriteError(
            f"{csv_path} holds {len(lost)} complete runs that the new table (from {source}) lacks, e.g. "
            f"{row} seed {seed}; pass --force to replace it"
        )


def publish(files: dict[Path, bytes], stale: Sequence[Path] = ()) -> None:
    """Write every file, or none: each goes to a temporary name beside its target (fsynced), and only when
    all are written are they renamed into place; then ``stale`` files (outputs of an earlier call that this
    one no longer makes, e.g. a curves plot without curves) are removed."""
    RF.write_atomic_all(files)
    for path in stale:
        if path not in files:
            path.unlink(missing_ok=True)


def make_table(
    grid_name: str | Path,
    *,
    scale: str | None = None,
    runs_root: str | Path = "results/runs",
    wandb: str | None = None,
    out: str | Path = "results",
    formats: str | list[str] | tuple[str, ...] = FORMATS,
    plots: bool = True,
    significance: bool = True,
    force: bool = False,
) -> TableResult:
    """Read the runs of one grid at one scale (run folders, or W&B with ``wandb="ENTITY/PROJECT"``), write
    ``<out>/<grid>-<scale>.md/.csv/.tex`` and the PNG plots beside them, and return the Markdown.

    All outputs are written together or not at all (``publish``). Unless ``force``, a table that lacks
    complete runs of the ``<grid>-<scale>.csv`` already in ``out`` is refused (``check_overwrite``)."""
    fmts = parse_formats(formats)
    grid = load_grid(grid_name)
    scale = scale or grid.default_scale
    if scale not in grid.scales:
        raise GridError(f"{grid.path}: unknown scale {scale!r}; scales are: {', '.join(grid.scales)}")
    if wandb:
        records = sources.collect_wandb_runs(grid, scale, wandb)
    else:
        records = sources.collect_folder_runs(grid, scale, runs_root)
    cache = Path(runs_root) / grid.name / scale / SIGNIFICANCE_CACHE
    table = build_table(grid, scale, records, significance=significance and not wandb, cache=cache)
    out = Path(out)
    stem = f"{grid.name}-{scale}"
    if not force:
        check_overwrite(table, out / f"{stem}.csv", f"W&B {wandb}" if wandb else str(runs_root))
    images: dict[str, bytes] = {}
    if plots:
        from experiments.tables.plots import render_plots  # matplotlib costs ~0.5 s to import

        images = render_plots(table, stem)
    markdown = render_markdown(table, images=list(images))
    render = {"md": lambda: markdown, "csv": lambda: render_csv(table), "tex": lambda: render_latex(table)}
    files = {out / f"{stem}.{fmt}": render[fmt]().encode() for fmt in fmts}
    files |= {out / name: data for name, data in images.items()}
    out.mkdir(parents=True, exist_ok=True)
    publish(files, stale=_plot_paths(out, stem) if plots else ())
    return TableResult(table, markdown, list(files))


def _plot_paths(out: Path, stem: str) -> list[Path]:
    from experiments.tables.plots import PLOTS, plot_name

    return [out / plot_name(stem, suffix) for suffix in PLOTS]
