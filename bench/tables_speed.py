"""How long ``tlit table`` takes for a full Table 3 (21 rows x 3 seeds), in process and as a fresh process.

Builds synthetic run folders in a temporary directory (config, summary, metrics with a training
log of the tiny scale's length, and dev hypotheses/references for the paired bootstrap), then times
``make_table`` in this process (imports already paid) and ``python -m experiments.cli table`` as a
subprocess (what a user waits for). The target is under 5 seconds. The last line printed is a JSON object
with ``seconds`` (the subprocess time) and the other figures.

    .venv/bin/python bench/tables_speed.py [--seeds 3] [--sentences 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.grids.grid import load_grid  # noqa: E402
from experiments.runs import folder as RF  # noqa: E402
from experiments.tables.build import SIGNIFICANCE_CACHE  # noqa: E402
from transformer_lit.params import count_parameters  # noqa: E402

WORDS = [f"w{i}" for i in range(400)]


def write_grid(folder: Path) -> Path:
    """table3.yaml with a 21st row (d_ff=8192), beside a copy of scales.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scales.yaml").write_text((ROOT / "ablations" / "scales.yaml").read_text())
    text = (ROOT / "ablations" / "table3.yaml").read_text().rstrip("\n")
    path = folder / "table3.yaml"
    path.write_text(text + '\n  C8: {label: "d_ff=8192", model.d_ff: 8192}\n')
    return path


def build_runs(root: Path, seeds: int, sentences: int, grid_file: Path, vocab: int = 1000) -> int:
    """Write complete synthetic run folders of every row of ``grid_file`` at scale tiny; return how many."""
    grid = load_grid(grid_file)
    rng = random.Random(0)
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(5, 25))) for _ in range(sentences)]
    count = 0
    for i, row in enumerate(grid.rows):
        for seed in range(seeds):
            cfg = grid.config(row, "tiny", seed)
            run_dir = root / "table3" / "tiny" / row / f"seed{seed}"
            run_dir.mkdir(parents=True)
            RF.write_config(run_dir, cfg)
            steps = cfg.train.max_steps
            ppl = 3.0 + 0.05 * i + 0.02 * seed
            lines = ["epoch,step,train/loss,train/lr,train/nll,val/loss,val/ppl"]
            for step in range(19, steps, 20):
                lines.append(f"0,{step},{3 - step / steps:.4f},0.002,{2.9 - step / steps:.4f},,")
                if (step + 1) % 200 == 0:
                    val = ppl * (1 + 3 * (steps - step) / steps)
                    lines.append(f"0,{step},,,,{math.log(val):.4f},{val:.4f}")
            RF.write_atomic(run_dir / RF.METRICS, "\n".join(lines) + "\n")
            hyp_rng = random.Random(hash((row, seed)))
            noise = 0.1 + 0.01 * i
            hyps = [
                " ".join(w if hyp_rng.random() > noise else hyp_rng.choice(WORDS) for w in r.split())
                for r in refs
            ]
            RF.write_atomic(run_dir / RF.HYPS_DEV, "\n".join(hyps) + "\n")
            RF.write_atomic(run_dir / RF.REFS_DEV, "\n".join(refs) + "\n")
            summary = {
                "grid": "table3",
                "scale": "tiny",
                "row": row,
                "seed": seed,
                "params": count_parameters(cfg.model, vocab),
                "vocab_size": vocab,
                "ppl_dev": ppl,
                "bleu_dev": 40 - i * 0.3 + seed * 0.1,
                "bleu_dev_tok": 41 - i * 0.3,
                "sacrebleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                "train_steps": steps,
                "train_tokens": steps * 900,
                "wall_seconds": steps * 0.04,
                "tokens_per_second": 22500.0,
                "device": "cpu (1 threads) x1",
                "git_sha": "0" * 40,
                "versions": {},
                "status": "complete",
            }
            RF.write_summary(run_dir, summary)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=500, help="dev sentences (tiny scale: 500)")
    parser.add_argument("--repeat", type=int, default=3, help="take the best of this many timings")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runs, out = Path(tmp) / "runs", Path(tmp) / "out"
        grid_file = write_grid(Path(tmp) / "ablations")
        n = build_runs(runs, args.seeds, args.sentences, grid_file)
        rows = len(load_grid(grid_file).rows)
        print(f"{n} synthetic run folders ({rows} rows x {args.seeds} seeds, {args.sentences} dev sentences)")

        cache = runs / "table3" / "tiny" / SIGNIFICANCE_CACHE
        cmd = [
            sys.executable,
            "-m",
            "experiments.cli",
            "table",
            str(grid_file),
            "--scale",
            "tiny",
            "--runs",
            str(runs),
            "--out",
            str(out / "cli"),
        ]

        def fresh_process(command: list[str], cold: bool = False) -> tuple[float, float]:
            """(wall, CPU) seconds of one subprocess; CPU time is what an idle machine's wall time would be
            (the command is single-threaded), useful when other jobs share the cores."""
            if cold:
                cache.unlink(missing_ok=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
            return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

        cold = min(fresh_process(cmd, cold=True) for _ in range(args.repeat))
        warm = min(fresh_process(cmd) for _ in range(args.repeat))
        imports = min(
            fresh_process([sys.executable, "-c", "import experiments.tables.build"]) for _ in range(2)
        )
        startup = min(fresh_process([sys.executable, "-c", "pass"]) for _ in range(2))
        import_s = imports[0] - startup[0]

        logging.disable(logging.WARNING)
        from experiments.tables.build import make_table

        in_process = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            result = make_table(grid_file, scale="tiny", runs_root=runs, out=out)
            in_process.append(time.perf_counter() - t)
        assert len(result.table.frame) == rows and (result.table.frame["seeds"] == args.seeds).all()
        assert result.table.frame["p_bleu"].notna().sum() == rows - 1
        t = time.perf_counter()
        make_table(
            grid_file, scale="tiny", runs_root=runs, out=out / "plain", plots=False, significance=False
        )
        bare = time.perf_counter() - t

    figures = {
        "seconds": round(cold[0], 3),
        "cold_seconds": round(cold[0], 3),
        "cold_cpu_seconds": round(cold[1], 3),
        "warm_seconds": round(warm[0], 3),
        "warm_cpu_seconds": round(warm[1], 3),
        "in_process_warm_seconds": round(min(in_process), 3),
        "in_process_no_plots_no_significance_seconds": round(bare, 3),
        "import_seconds": round(import_s, 3),
        "runs": n,
        "rows": rows,
        "dev_sentences": args.sentences,
        "load_average": round(os.getloadavg()[0], 2),
        "target_seconds": 5.0,
    }
    print(
        f"tlit table, {rows} rows x {args.seeds} seeds, {args.sentences} dev sentences, as a fresh process: "
        f"{cold[0]:.2f} s ({cold[1]:.2f} s CPU) on a first call, which runs the paired bootstrap; "
        f"{warm[0]:.2f} s ({warm[1]:.2f} s CPU) later, p-values cached. Target < 5 s. In process: "
        f"{min(in_process):.2f} s warm, {bare:.2f} s without plots and significance; "
        f"imports {import_s:.2f} s; "
        f"load average {figures['load_average']} on {os.cpu_count()} cores"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
