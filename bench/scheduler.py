"""Scheduler overhead of the local launcher: the grid's makespan against the longest-processing-time bound.

Run: ``.venv/bin/python bench/scheduler.py [--quick] [--slots 2,4] [--total 24] [--noise 0.0]``

Twenty fake jobs (``experiments.launchers.base.fake_job``: a Python process that sleeps, then writes a
complete summary) with durations spread like the real grid's: the Table 3 rows' cost estimates at the
tiny scale (``big`` alone is about a third of the work), scaled so that they sum to ``--total`` seconds.
Each job runs through the real launcher (locks, logs, process groups, polling) on k CPU slots.

The bound is the classic lower bound of any schedule, max(longest job, sum / k); the ratio
makespan / bound therefore counts both the scheduler's overhead (process start, the time to notice an exit,
locking) and LPT's own imperfection. ``--noise`` perturbs the true durations around the estimates the
scheduler sees (real estimates are rough). Prints a table; the LAST line is a JSON object with
``makespan_ratio`` (the worst over the slot counts; target <= 1.1) and the figures per k.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.grids import grid as G  # noqa: E402
from experiments.grids.runner import lpt_makespan  # noqa: E402
from experiments.launchers import base as B  # noqa: E402
from experiments.launchers import local  # noqa: E402


def grid_like_durations(total: float) -> dict[str, float]:
    """Table 3 rows -> seconds, proportional to their tiny-scale cost estimates, summing to ``total``."""
    grid = G.load_grid("table3")
    cost = {row: B.estimate_seconds(grid.config(row, "tiny")) for row in grid.rows}
    scale = total / sum(cost.values())
    return {row: c * scale for row, c in cost.items()}


def measure(durations: dict[str, float], slots: int, noise: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for row, estimate in durations.items():
            actual = estimate * (1 + rng.uniform(-noise, noise))
            jobs.append((B.fake_job(row, Path(tmp) / row, actual, cost=estimate), actual))
        launcher = local.LocalLauncher(local.parse_devices(f"cpu:{slots}"))
        start = time.perf_counter()
        results = launcher.run([j for j, _ in jobs])
        makespan = time.perf_counter() - start
    assert all(r.state == B.JobState.DONE for r in results), [
        r for r in results if r.state != B.JobState.DONE
    ]
    actual = [a for _, a in jobs]
    bound = max(max(actual), sum(actual) / slots)
    return {
        "slots": slots,
        "jobs": len(jobs),
        "sum_s": sum(actual),
        "longest_s": max(actual),
        "bound_s": bound,
        "lpt_ideal_s": lpt_makespan(actual, slots),
        "makespan_s": makespan,
        "ratio": makespan / bound,
        "overhead_per_job_ms": 1000 * (makespan - lpt_makespan(actual, slots)) * slots / len(jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="2,4", help="comma list of slot counts (default: 2,4)")
    parser.add_argument("--total", type=float, default=24.0, help="sum of the job durations in seconds")
    parser.add_argument("--noise", type=float, default=0.0, help="true duration = estimate x (1 +- noise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="--total 10")
    args = parser.parse_args()
    total = 10.0 if args.quick else args.total
    durations = grid_like_durations(total)
    rows = [measure(durations, int(k), args.noise, args.seed) for k in args.slots.split(",")]

    print(f"{len(durations)} fake jobs shaped like Table 3 at the tiny scale, {total:.0f} s of work in all")
    head = (
        "slots",
        "jobs",
        "sum_s",
        "longest_s",
        "bound_s",
        "lpt_ideal_s",
        "makespan_s",
        "ratio",
        "overhead_per_job_ms",
    )
    print("  ".join(f"{h:>10}" for h in head))
    for r in rows:
        print("  ".join(f"{r[h]:>10.3f}" if isinstance(r[h], float) else f"{r[h]:>10}" for h in head))
    summary = {"makespan_ratio": round(max(r["ratio"] for r in rows), 4)}
    for r in rows:
        k = r["slots"]
        summary |= {
            f"k{k}_ratio": round(r["ratio"], 4),
            f"k{k}_makespan_s": round(r["makespan_s"], 3),
            f"k{k}_bound_s": round(r["bound_s"], 3),
            f"k{k}_overhead_per_job_ms": round(r["overhead_per_job_ms"], 1),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
