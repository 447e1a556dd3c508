"""Sweep workers and pruning: wall time of 1 vs 2 workers, and training steps saved by the pruner.

Run: ``.venv/bin/python bench/sweep_scaling.py [--trials 12] [--pruning-trials 20] [--steps 800] [--out DIR]``

1. Scaling: the same micro sweep (``--trials`` real trials: d_model 32, ``--steps`` optimizer steps, random
   sampler, no pruning) with ``tlit sweep --workers 1 --devices cpu:1`` and then ``--workers 2 --devices
   cpu:2``; each worker is one process with one thread. The space (h at constant computation, P_drop,
   eps_ls, lr factor) changes results, not costs, so two workers finish their shares together. Target on 2
   free cores: about half the time with 2 workers; what keeps it under 2x is paid once per sweep, not per
   trial (a worker's imports, ~4 s, and the last trial of one worker while the other has none left).
   A second pass with the test-only stand-in trial (a sleep, no CPU) shows what the workers' scheduling
   gives when the cores are not the limit (other jobs on the machine do not change it).
2. Pruning: ``--pruning-trials`` trials with the median pruner (dev PPL ten times a trial) against the same
   sweep without it, both on 2 workers with the same seeded random sampler (each worker draws from its own
   seeded sequence, so the two sweeps sample nearly the same points).
   Training steps are summed over the run folders (complete or pruned). Target: >= 30%
   fewer steps.

Timings depend on what else runs on the machine: the load average before and after is printed. The LAST
line is one JSON object with ``speedup`` and ``pruning_step_cut`` and the measurements behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.runs import folder as RF  # noqa: E402

MICRO = {
    "model.num_layers": 1, "model.d_model": 32, "model.d_ff": 128, "data.synthetic_pairs": 400,
    "data.synthetic_eval_pairs": 50, "data.vocab_size": 200, "eval.max_sentences": 10,
    "optim.warmup_steps": 30, "train.wandb": False, "train.progress_bar": False,
}  # fmt: skip
PARAMS = {  # knobs that change the result, not the cost: workers finish their shares together
    "model.num_heads": {"choices": [1, 2, 4]},  # with d_k = d_v = d_model / h (constraint fixed_compute)
    "model.dropout": {"low": 0.0, "high": 0.3},
    "optim.label_smoothing": {"low": 0.0, "high": 0.2},
    "optim.lr_factor": {"low": 0.25, "high": 4.0, "log": True},
}


def write_sweep(folder: Path, name: str, trials: int, steps: int, pruner: str, cache: Path) -> Path:
    every = max(1, steps // 10)  # ten validations per trial: what the pruner sees
    fixed = {**MICRO, "train.max_steps": steps, "train.val_every_n_steps": every}
    fixed |= {"train.checkpoint_every_n_steps": steps, "data.cache_dir": str(cache)}
    doc = {
        "study": name,
        "scale": "tiny",
        "sampler": "random",
        "sampler_options": {"seed": 0},
        "pruner": pruner,
        "trials": trials,
        "constraint": "fixed_compute",
        "params": PARAMS,
        "fixed": fixed,
    }
    if pruner == "median":
        doc["pruner_options"] = {"n_startup_trials": 4, "n_warmup_steps": every}
    path = folder / f"{name}.yaml"
    path.write_text(f"# tlit sweep {path}\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def run_sweep(folder: Path, path: Path, workers: int, standin: float = 0.0) -> tuple[float, float]:
    """Run ``tlit sweep`` on ``workers`` CPU slots; returns (wall seconds, CPU seconds of its processes).
    ``standin``: seconds of the test-only stand-in trial instead of training (0: train)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TLIT_SWEEP_STANDIN", None)
    if standin:
        env["TLIT_SWEEP_STANDIN"] = str(standin)
    argv = [sys.executable, "-m", "experiments.cli", "sweep", str(path), "--workers", str(workers)]
    argv += ["--devices", f"cpu:{workers}"]
    cpu0 = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu0
    if done.returncode != 0:
        sys.exit(f"{path.stem} failed:\n{done.stdout}\n{done.stderr}")
    last = done.stdout.strip().splitlines()[-1]
    print(f"  {path.stem}: {workers} worker(s), {seconds:.1f} s wall, {cpu:.1f} s CPU; {last}")
    return seconds, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: workers included
    return usage.ru_utime + usage.ru_stime


def total_steps(folder: Path, study: str) -> tuple[int, int, int]:
    """(training steps, complete trials, pruned trials) from the study's run folders."""
    steps = complete = pruned = 0
    for run in sorted((folder / "results" / "runs" / study / "tiny").glob("study-*/trial*/seed0")):
        state = RF.classify(run).state
        if state is RF.RunState.COMPLETE:
            steps += json.loads((run / RF.SUMMARY).read_text())["train_steps"]
            complete += 1
        elif state is RF.RunState.PRUNED:
            steps += json.loads((run / RF.PRUNED).read_text())["train_steps"]
            pruned += 1
    return steps, complete, pruned


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials of the scaling sweep")
    parser.add_argument("--pruning-trials", type=int, default=20, help="trials of the pruning sweeps")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per trial (~8 s each)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--standin",
        type=float,
        default=1.5,
        help="seconds of a stand-in trial for the scheduling check (0: skip)",
    )
    args = parser.parse_args()

    folder = Path(args.out or tempfile.mkdtemp(prefix="sweep_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "cache"
    before = load()
    loadavg = Path("/proc/loadavg").read_text().strip()
    print(f"cores: {os.cpu_count()}, load average before: {before:.2f} ({loadavg})")
    result: dict[str, float | int] = {"cores": os.cpu_count() or 0, "load_before": round(before, 2)}

    # warm the tokenizer cache so that neither timed sweep pays for it
    run_sweep(folder, write_sweep(folder, "warmup", 1, 5, "none", cache), 1)

    if not args.skip_scaling:
        print(f"scaling: {args.trials} trials x {args.steps} steps, no pruning")
        one, cpu1 = run_sweep(
            folder, write_sweep(folder, "scale1", args.trials, args.steps, "none", cache), 1
        )
        two, cpu2 = run_sweep(
            folder, write_sweep(folder, "scale2", args.trials, args.steps, "none", cache), 2
        )
        speedup = one / two
        print(f"  speedup with 2 workers: {speedup:.2f}x ({one:.1f} s -> {two:.1f} s; ideal 2.00x)")
        print(f"  cores used on average: {cpu1 / one:.2f} with 1 worker, {cpu2 / two:.2f} with 2 (of 2)")
        result |= {"trials": args.trials, "time_1_worker_s": round(one, 1), "time_2_workers_s": round(two, 1)}
        result |= {"cpu_1_worker_s": round(cpu1, 1), "cpu_2_workers_s": round(cpu2, 1)}
        result["speedup"] = round(speedup, 3)

    if args.standin:
        print(f"scheduling: {args.trials} stand-in trials of {args.standin} s (sleep, no CPU), no pruning")
        one, _ = run_sweep(
            folder, write_sweep(folder, "sched1", args.trials, 10, "none", cache), 1, args.standin
        )
        two, _ = run_sweep(
            folder, write_sweep(folder, "sched2", args.trials, 10, "none", cache), 2, args.standin
        )
        print(
            f"  speedup with 2 workers: {one / two:.2f}x ({one:.1f} s -> {two:.1f} s): the workers' own share"
        )
        result |= {"speedup_standin": round(one / two, 3)}

    print(f"pruning: {args.pruning_trials} trials x {args.steps} steps, 2 workers, median pruner vs none")
    run_sweep(folder, write_sweep(folder, "nopruning", args.pruning_trials, args.steps, "none", cache), 2)
    run_sweep(folder, write_sweep(folder, "pruning", args.pruning_trials, args.steps, "median", cache), 2)
    full, _, _ = total_steps(folder, "nopruning")
    cut_steps, complete, pruned = total_steps(folder, "pruning")
    cut = 1 - cut_steps / full
    print(
        f"  training steps: {full} without pruning, {cut_steps} with ({complete} complete, {pruned} pruned)"
    )
    print(f"  pruning cuts the training steps by {cut:.0%} (target >= 30%)")
    after = load()
    print(f"load average after: {after:.2f}")
    result |= {
        "pruning_trials": args.pruning_trials,
        "steps_no_pruning": full,
        "steps_pruning": cut_steps,
        "pruned_trials": pruned,
        "pruning_step_cut": round(cut, 3),
        "load_after": round(after, 2),
    }
    if not args.out:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
