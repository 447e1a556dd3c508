"""The tiny scale's regime, lever by lever (issue 16): is base converged, and does a model without dropout
overfit?

Run: ``.venv/bin/python bench/tiny_regime.py [--only NAME,...] [--jobs 2] [--rows base,D1] [--out DIR]``,
or ``--grid-runs results/runs/table3/tiny-long`` to judge every finished run of a grid at one scale.

Each lever is a set of overrides on top of the tiny scale of ``ablations/table3.yaml``. For every lever the
script trains the rows (base and D1 by default) with ``tlit train --row ROW --scale tiny``, one thread per
run, ``--jobs`` runs at a time, and reads their ``metrics.csv``. The regime criteria, judged on the dev PPL
curve (validation every ``--val-every`` steps), decide the tiny scale's settings; agreement with the paper
is never looked at here:

- converged: base's dev PPL improved by less than 5% over the last third of its steps (``plateau``);
- data-limited: D1 (no dropout) overfits, its final dev PPL at least 3% above its best (``rises``).

Prints a Markdown table (lever, row, final and best dev PPL with its step, BLEU, plateau, rises, seconds of
training and of the whole run); the LAST line is one JSON object with the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Levers in the order they were tried, as overrides of the tiny scale; the outcome of each is logged in
# bench/README.md ("tiny regime").
LEVERS: dict[str, str] = {
    "shipped-700": "",
    "p2000-lr0.6-w200": "data.synthetic_pairs=2000 optim.lr_factor=0.6 optim.warmup_steps=200"
    " train.max_steps=1000",
    "p1500-lr0.2-w100-500": "data.synthetic_pairs=1500 optim.lr_factor=0.2 optim.warmup_steps=100"
    " train.max_steps=500",
    "p1500-lr0.3-w100-500": "data.synthetic_pairs=1500 optim.lr_factor=0.3 optim.warmup_steps=100"
    " train.max_steps=500",
    "p10000-2100": "data.synthetic_pairs=10000 train.max_steps=2100",
}


def run_one(out: Path, lever: str, row: str, overrides: list[str], val_every: int) -> dict:
    run_dir = out / lever / row
    cmd = [
        sys.executable, "-m", "experiments.cli", "train", "--row", row, "--scale", "tiny",
        "--out", str(run_dir), *overrides, f"train.val_every_n_steps={val_every}", "train.progress_bar=false",
    ]  # fmt: skip
    start = time.perf_counter()
    if not (run_dir / "summary.json").is_file():
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            return {"lever": lever, "row": row, "error": proc.stdout[-400:] + proc.stderr[-400:]}
    return judge(run_dir, lever, row, time.perf_counter() - start)


def judge(run_dir: Path, lever: str, row: str, seconds: float | None = None) -> dict:
    """The regime criteria on one finished run folder's dev PPL curve."""
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = _val_curve(run_dir / "metrics.csv")
    steps = [s for s, _ in curve]
    ppls = [p for _, p in curve]
    best = min(range(len(ppls)), key=ppls.__getitem__)
    third = next(i for i, s in enumerate(steps) if s >= steps[-1] * 2 / 3)
    return {
        "lever": lever,
        "row": row,
        "ppl_final": round(summary["ppl_dev"], 3),
        "ppl_best": round(ppls[best], 3),
        "best_step": steps[best],
        "bleu": round(summary["bleu_dev"], 1),
        "plateau": ppls[third] / ppls[-1] < 1.05,
        "rises": ppls[-1] > 1.03 * ppls[best],
        "train_s": round(summary["wall_seconds"], 1),
        "run_s": round(seconds, 1) if seconds is not None else None,
    }


def _val_curve(path: Path) -> list[tuple[int, float]]:
    """(step, dev PPL) of every validation, in step order (the final one logged once)."""
    with path.open(newline="") as fh:
        points = {int(r["step"]): float(r["val/ppl"]) for r in csv.DictReader(fh) if r.get("val/ppl")}
    return sorted(points.items())


def train_levers(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    levers = args.only.split(",")
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        p.error(f"--only: unknown lever {unknown[0]!r}; levers: {', '.join(LEVERS)}")
    jobs = [(lever, row) for lever in levers for row in args.rows.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(
            pool.map(lambda j: run_one(args.out, j[0], j[1], LEVERS[j[0]].split(), args.val_every), jobs)
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(LEVERS), help="levers to run, comma-separated")
    p.add_argument("--rows", default="base,D1")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("bench/.tiny_regime"))
    p.add_argument(
        "--grid-runs",
        type=Path,
        default=None,
        help="judge the finished runs of a grid instead of training: RUNS/GRID/SCALE (every row and seed)",
    )
    args = p.parse_args(argv)
    if args.grid_runs is not None:
        folders = sorted(args.grid_runs.glob("*/seed*/summary.json"))
        if not folders:
            p.error(f"--grid-runs: no finished runs under {args.grid_runs} (expected ROW/seedK/summary.json)")
        scale = args.grid_runs.name
        results = [judge(f.parent, scale, f"{f.parent.parent.name}/{f.parent.name}") for f in folders]
    else:
        results = train_levers(p, args)
    print("| lever | row | dev PPL | best (step) | BLEU | plateau | rises | train s | run s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['lever']} | {r['row']} | failed: {r['error'][-120:]!r} |")
            continue
        print(
            f"| {r['lever']} | {r['row']} | {r['ppl_final']:.2f} | {r['ppl_best']:.2f} ({r['best_step']}) "
            f"| {r['bleu']:.1f} | {r['plateau']} | {r['rises']} | {r['train_s']:.0f} | {r['run_s'] or ''} |"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
