"""``tlit``: one command line for training, evaluation, grids, sweeps and tables. Thin: it parses arguments,
calls the library and prints; nothing heavy is imported before a subcommand needs it.

User errors (a bad config value, a missing file, an unknown grid) print one line and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.runs.locks import LockBusy
from transformer_lit import config as C
from transformer_lit.errors import NonFiniteLossError, os_error_line


class IntermixedParser(argparse.ArgumentParser):
    """An argparse parser that accepts ``FILE --scale tiny k=v --rows A k=v``: options between positionals.

    Plain argparse stops filling a ``nargs="*"`` positional at the first option, so the overrides after
    ``--scale tiny`` would be "unrecognized arguments". The parser class of every subcommand, so that
    ``tlit train --out X model.num_heads=4 --scale tiny train.max_steps=1`` parses like ``tlit grid run``. A
    parser with subcommands of its own (``grid``, ``data``) parses plainly: argparse cannot intermix those.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if getattr(self, "_intermixing", False) or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NonFiniteLossError, LockBusy)


OVERRIDES_HELP = (
    "config overrides section.field=value, any number, before or after the options "
    "(e.g. model.num_heads=16 train.max_steps=2000); every field: tlit train --help"
)


def _sections_help() -> str:
    lines = ["config sections (override any field as section.field=value; tlit train --help lists them all):"]
    for name, cls in C.SECTIONS.items():
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        lines.append(f"  {name}: {fields}")
    lines.append("examples: model.num_heads=16 model.d_k=32 train.max_steps=2000 data.corpus=text")
    return "\n".join(lines)


FIELDS_EPILOG = "<every config field>"
"""Placeholder epilog of ``tlit train``: the field list is built only when that help is printed (it reads
config.py's docstrings, ~50 ms that no other command should pay)."""


def fields_help(width: int = 100) -> str:
    """Every config field with its type (allowed values), default and docstring: ``tlit train --help``."""
    import textwrap

    lines = ["config fields (override any as section.field=value; defaults are the paper's base model):"]
    section = ""
    for f in C.field_help():
        if f.key.split(".")[0] != section:
            section = f.key.split(".")[0]
            lines.append(f"{section}:")
        default = (
            "null"
            if f.default is None
            else str(f.default).lower()
            if isinstance(f.default, bool)
            else f.default
        )
        lines.append(f"  {f.key} ({f.kind}, default {default})")
        lines += textwrap.wrap(f.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _FieldsFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_text(self, text: str) -> str:
        return super()._format_text(fields_help() if text == FIELDS_EPILOG else text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one run into its run folder",
        epilog=FIELDS_EPILOG,
        formatter_class=_FieldsFormatter,
    )
    p.add_argument("--grid", default=None, help="grid file or name (default: table3)")
    p.add_argument("--row", default=None, help="row of the grid (default: base)")
    p.add_argument("--scale", default=None, help="scale: paper, small, tiny, ... (default: tiny)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of initialisation, dropout and batch order (train.seed; default: 0); "
        "each seed is its own run folder",
    )
    p.add_argument(
        "--out", default=None, help="run folder (default: results/runs/<grid>/<scale>/<row>/seed<k>)"
    )
    p.add_argument("--runs", default="results/runs", help="root of the run folders")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B (train.wandb=false)")
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="train the run already planned in DIR (its config.yaml, as tlit grid run writes it); "
        "overrides: run-time fields only",
    )
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.runs import folder as RF
    from experiments.runs import run as R

    if args.no_wandb:
        args.overrides = [*args.overrides, "train.wandb=false"]
    if args.run_dir is not None:  # a launcher's child: the config was resolved by the planner
        given = [f"--{n}" for n in ("grid", "row", "scale", "seed", "out") if getattr(args, n) is not None]
        if given:
            raise ValueError(f"--run-dir trains the run planned there; {given[0]} cannot be given with it")
        run_dir = Path(args.run_dir)
        cfg, info = R.planned(run_dir, args.overrides)
    else:
        cfg, info, run_dir = _resolve_train(args)
    status = RF.classify(run_dir, expected=cfg, check_lock=False)  # a live lock: refused just below
    if status.state in (RF.RunState.CONFLICT, RF.RunState.CORRUPT):
        raise RF.RunFolderConflict(status.refusal(run_dir))
    if status.state is RF.RunState.COMPLETE:
        print(f"{run_dir} is already complete (same config); nothing to do")
        return 0
    with _run_lock(run_dir):
        summary = R.train(cfg, run_dir, info)
    if summary:
        print(
            f"{run_dir}: ppl_dev={summary['ppl_dev']:.3f} bleu_dev={summary['bleu_dev']:.2f} "
            f"bleu_dev_tok={summary['bleu_dev_tok']:.2f} steps={summary['train_steps']} "
            f"params={summary['params']:,} wall={summary['wall_seconds']:.0f}s"
        )
    return 0


def _resolve_train(args: argparse.Namespace) -> tuple:
    """``tlit train --grid G --row R --scale S --seed K k=v``: the run's config, names and folder."""
    from experiments.grids import grid as G
    from experiments.runs.folder import RunInfo

    name, row, scale = args.grid or G.DEFAULT_GRID, args.row or "base", args.scale or "tiny"
    seed = 0 if args.seed is None else args.seed
    grid = G.load_grid(name)
    cfg = grid.config(row, scale, seed, dict(C.parse_override(o) for o in args.overrides))
    run_dir = Path(args.out) if args.out else G.run_dir_for(args.runs, grid.name, scale, row, seed)
    return cfg, RunInfo(grid=grid.name, scale=scale, row=row), run_dir


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Hold the run folder's lock unless a launcher already holds it for us (or we are a DDP child rank)."""
    from experiments.launchers.base import LOCK_HELD_ENV
    from experiments.runs.locks import RunLock

    if os.environ.get(LOCK_HELD_ENV) or int(os.environ.get("LOCAL_RANK", "0")) > 0:
        yield
        return
    with RunLock(run_dir):
        os.environ[LOCK_HELD_ENV] = "1"  # inherited by Lightning's DDP child processes
        try:
            yield
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="decode a split of a run and score it (writes eval_<split>.json)")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--beam", type=int, default=None, help="(default: the run's eval.beam_size)")
    p.add_argument("--alpha", type=float, default=None, help="(default: the run's eval.alpha)")
    p.add_argument("--max-len-b", type=int, default=None, help="(default: the run's eval.max_len_b)")
    p.add_argument("--average", type=int, default=None, metavar="K", help="average the last K checkpoints")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("translate", help="translate stdin to stdout with a run's model")
    p.add_argument("run_dir")
    p.add_argument("--beam", type=int, default=None, help="(default: the run's eval.beam_size)")
    p.add_argument("--alpha", type=float, default=None, help="(default: the run's eval.alpha)")
    p.add_argument("--average", type=int, default=None, metavar="K")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("average", help="average the parameters of a run's last K checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--last", type=int, required=True, metavar="K")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_average)


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.runs.evaluate import eval_run

    result = eval_run(
        args.run_dir,
        split=args.split,
        beam=args.beam,
        alpha=args.alpha,
        average=args.average,
        max_len_b=args.max_len_b,
    )
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from experiments.runs.evaluate import translate_lines

    lines = [line.rstrip("\n") for line in sys.stdin]
    hyps = translate_lines(
        args.run_dir,
        lines,
        beam=args.beam,
        alpha=args.alpha,
        average=args.average,
        progress=not sys.stdin.isatty(),
    )
    sys.stdout.write("".join(h + "\n" for h in hyps))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from experiments.runs.evaluate import average_run

    path = average_run(args.run_dir, args.last, args.output)
    print(f"averaged the last {args.last} checkpoints of {args.run_dir} into {path}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="prepare a corpus once for every run, download WMT14, or write the synthetic corpus"
    )
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=IntermixedParser)
    s = dsub.add_parser("synth", help="write the built-in synthetic corpus as text files")
    s.add_argument("--out", required=True)
    s.add_argument("--pairs", type=int, default=None, help="training pairs (default: data.synthetic_pairs)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)
    w = dsub.add_parser("wmt14", help="download WMT14 En-De as text files (needs internet; resumable)")
    w.add_argument("--out", required=True)
    w.set_defaults(func=cmd_data_wmt14)
    r = dsub.add_parser(
        "prepare",
        help="encode a run's corpus once (vocabulary, ids, lengths) into data.cache_dir; runs map it",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--grid", default="table3", help="grid file or name (default: table3)")
    r.add_argument("--row", default="base", help="row of the grid (default: base)")
    r.add_argument("--scale", default="tiny", help="scale whose data settings to use (default: tiny)")
    r.add_argument("--force", action="store_true", help="prepare again (replaces a damaged folder)")
    r.add_argument("--verify", action="store_true", help="also check every file's sha256 against the index")
    r.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)
    r.set_defaults(func=cmd_data_prepare)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from transformer_lit.corpora import write_synthetic

    values: dict = {"data.synthetic_seed": args.seed}
    if args.pairs is not None:
        values["data.synthetic_pairs"] = args.pairs
    cfg = C.apply_overrides(C.base(), values).data
    for path in write_synthetic(args.out, cfg):
        print(path)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """The data settings are resolved exactly as ``tlit train`` resolves them (grid row, scale, overrides)."""
    import json

    from experiments.grids import grid as G
    from transformer_lit import prepared
    from transformer_lit.preparation import ensure_plan, ensure_prepared

    grid = G.load_grid(args.grid)
    overrides = dict(C.parse_override(o) for o in args.overrides)
    cfg = grid.config(args.row, args.scale, 0, overrides)
    folder = ensure_prepared(cfg.data, force=args.force)
    ensure_plan(folder, cfg.data.max_tokens)
    if args.verify:
        prepared.verify(folder)
    index = prepared.read_index(folder)
    sizes = sum(f.stat().st_size for f in folder.iterdir())
    counts = ", ".join(f"{name} {s['pairs']}" for name, s in index["splits"].items())
    checked = "; sha256 of every file checked" if args.verify else ""
    print(f"{folder}: {counts} pairs, vocabulary {index['vocab_size']}, {sizes / 2**20:.1f} MiB{checked}")
    dropped = {k: v for k, v in index["splits"]["train"].items() if k.startswith("dropped") and v}
    if dropped:
        print(f"training pairs dropped: {json.dumps(dropped)}")
    return 0


def cmd_data_wmt14(args: argparse.Namespace) -> int:
    from transformer_lit.wmt14 import prepare_wmt14

    out = prepare_wmt14(args.out)
    print(f"WMT14 En-De prepared in {out}")
    return 0


def _add_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table",
        help="rebuild a grid's result table (beside the paper's Table 3) and plots from run folders or W&B",
    )
    p.add_argument("grid", help="grid name or file (e.g. table3 or ablations/table3.yaml)")
    p.add_argument("--scale", default=None, help="scale (default: the grid's default_scale)")
    p.add_argument("--runs", default="results/runs", help="root of the run folders (default: results/runs)")
    p.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read the runs from W&B instead")
    p.add_argument("--out", default="results", help="where <grid>-<scale>.md/.csv/.tex and plots go")
    p.add_argument("--format", default="md,csv,tex", help="comma list of md, csv, tex (default: all)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a table that holds complete runs the new one lacks (refused otherwise)",
    )
    p.set_defaults(func=cmd_table)


def cmd_table(args: argparse.Namespace) -> int:
    from experiments.tables.build import make_table

    result = make_table(
        args.grid,
        scale=args.scale,
        runs_root=args.runs,
        wandb=args.wandb,
        out=args.out,
        formats=args.format,
        plots=not args.no_plots,
        force=args.force,
    )
    print(result.markdown, end="")
    for path in result.files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


LAUNCHER_HELP = "local: this node's --devices; slurm: one SLURM job array (options below)"


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    """The SLURM group of ``grid run`` and ``sweep`` (one task per run, or per sweep worker)."""
    s = p.add_argument_group(
        "slurm (--launcher slurm; --devices all: GPUs if the partition has them, cpu: CPU-only tasks, "
        "cuda: GPUs; GPUs or cores per task = train.devices)"
    )
    s.add_argument("--partition", default=None)
    s.add_argument(
        "--time",
        type=int,
        default=24 * 60,
        metavar="MINUTES",
        help="per task; longer runs requeue",
    )
    s.add_argument("--mem", type=float, default=None, metavar="GB", help="memory per task (e.g. 2 or 1.5)")
    s.add_argument("--cpus-per-gpu", type=int, default=8)
    s.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        metavar="N",
        help="time limits after which a run is marked failed instead of requeued (default: 3)",
    )
    s.add_argument(
        "--signal-delay",
        type=int,
        default=None,
        metavar="SECONDS",
        help="USR2 (checkpoint and requeue) this long before the time limit (default: 120, at most --time/2)",
    )
    s.add_argument("--slurm-folder", default="results/slurm", help="submitit logs (on a shared filesystem)")
    s.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. account=abc (repeatable)",
    )
    s.add_argument("--no-wait", action="store_true", help="submit and return (tlit grid status follows them)")


def _slurm_options(args: argparse.Namespace, folder: Path, accelerators: set[str]) -> Any:
    """``SlurmOptions`` from the SLURM group, checked (one line per bad value); GPUs or CPU-only tasks from
    ``--devices`` and the partition."""
    from experiments.launchers import slurm

    opts = slurm.SlurmOptions(
        folder=folder,
        partition=args.partition,
        time_min=args.time,
        mem_gb=args.mem,
        cpus_per_gpu=args.cpus_per_gpu,
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay,
        extra=dict(C.parse_override(a) for a in args.slurm_arg),
    )
    opts.check()
    opts.gpus = slurm.wants_gpus(args.devices or "all", args.partition, accelerators)
    return opts


def _add_grid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="run a grid (rows x seeds) on this node or SLURM; its status; its plan")
    gsub = p.add_subparsers(dest="grid_cmd", required=True, parser_class=IntermixedParser)

    def selection(q: argparse.ArgumentParser) -> None:
        q.add_argument("file", help="grid file or name (e.g. ablations/table3.yaml or table3)")
        q.add_argument("--scale", default=None, help="scale: paper, small, tiny, ... (default: the grid's)")
        q.add_argument("--rows", default=None, help="rows or groups, e.g. A1,B (= B1,B2) (default: all)")
        q.add_argument("--seeds", default="1", help="number of seeds (3: seeds 0,1,2) or a list (0,2)")
        q.add_argument(
            "--runs", default="results/runs", help="root of the run folders (default: results/runs)"
        )
        q.add_argument(
            "--lock-timeout",
            type=float,
            default=900.0,
            metavar="SECONDS",
            help="trust another host's run lock until it is this old without heartbeat",
        )

    devices = "slots of this node: all, cpu:N, cpu:all, cuda:0,1,... (default: all)"
    jobs_per_device = (
        "one-GPU runs sharing each GPU (default 1; on SLURM: per array task's GPU); multi-GPU runs "
        "still take whole GPUs; refused when the largest N would not fit the card"
    )
    r = gsub.add_parser(
        "run",
        help="run the grid's unfinished runs; resumable, safe to run twice at once",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    selection(r)
    r.add_argument("--devices", default="all", help=devices)
    r.add_argument("--jobs-per-device", type=int, default=1, metavar="N", help=jobs_per_device)
    r.add_argument("--launcher", choices=("local", "slurm"), default="local", help=LAUNCHER_HELP)
    r.add_argument("--retries", type=int, default=1, help="attempts after a failure (default: 1)")
    r.add_argument("--no-wandb", action="store_true", help="do not log to W&B (train.wandb=false)")
    _add_slurm_options(r)
    r.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)
    r.set_defaults(func=cmd_grid_run)

    st = gsub.add_parser(
        "status", help="one line per run: complete/running/failed/interrupted/pending/..., PPL, BLEU, time"
    )
    selection(st)
    st.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="the overrides the grid was run with (a run with another config shows as conflict)",
    )
    st.set_defaults(func=cmd_grid_status)

    pl = gsub.add_parser("plan", help="what grid run would run, sizes and rough cost; runs nothing")
    selection(pl)
    pl.add_argument("--devices", default="all", help=devices)
    pl.add_argument("--jobs-per-device", type=int, default=1, metavar="N", help=jobs_per_device)
    pl.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="a GPU's measured speed (bench/gpu_check.py writes it) instead of the fixed CPU-based factor",
    )
    pl.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)
    pl.set_defaults(func=cmd_grid_plan)


def _grid_specs(args: argparse.Namespace, overrides: list[str]) -> tuple:
    from experiments.grids import grid as G
    from experiments.grids import runner as gridrun

    grid = G.load_grid(args.file)
    specs = gridrun.specs_for(
        grid, args.scale, rows=args.rows, seeds=args.seeds, overrides=overrides, runs=args.runs
    )
    return grid, specs


def cmd_grid_run(args: argparse.Namespace) -> int:
    from experiments.grids import runner as gridrun

    overrides = [*args.overrides, *(["train.wandb=false"] if args.no_wandb else [])]
    grid, specs = _grid_specs(args, overrides)
    slurm = None
    if args.launcher == "slurm":
        folder = Path(args.slurm_folder) / grid.name / specs[0].scale
        slurm = _slurm_options(args, folder, {s.config.train.accelerator for s in specs})
    launcher = gridrun.make_launcher(
        args.launcher,
        devices=args.devices,
        jobs_per_device=args.jobs_per_device,
        retries=args.retries,
        lock_timeout=args.lock_timeout,
        slurm=slurm,
        job_name=f"tlit-{grid.name}-{specs[0].scale}",
    )
    if args.launcher == "slurm":
        launcher.wait = not args.no_wait
        launcher.preflight({s.config.train.devices for s in specs})
    else:
        from experiments.launchers.local import check_accelerator, check_packing
        from transformer_lit.memory import training_memory

        for spec in specs:
            check_accelerator(launcher.slots, spec.config.train.accelerator)
        one_gpu = [s for s in specs if s.config.train.devices == 1]
        check_packing(launcher.slots, [(s.name, training_memory(s.config).total) for s in one_gpu])
    where = getattr(launcher, "slots", launcher)
    print(f"{grid.name}/{specs[0].scale}: {len(specs)} runs on {where}, retries {args.retries}")
    return gridrun.run_grid(specs, launcher, sys.stdout)


def cmd_grid_status(args: argparse.Namespace) -> int:
    from experiments.grids import runner as gridrun

    _, specs = _grid_specs(args, args.overrides)
    states = [gridrun.run_state(s, args.lock_timeout) for s in specs]
    print(gridrun.format_status(states, gridrun.slurm_states(states)))
    return 0


def cmd_grid_plan(args: argparse.Namespace) -> int:
    from experiments.grids import runner as gridrun
    from experiments.launchers.calibration import load_calibration
    from experiments.launchers.local import parse_devices

    _, specs = _grid_specs(args, args.overrides)
    slots = parse_devices(args.devices, args.jobs_per_device)
    calibration = load_calibration(args.calibration) if args.calibration else None
    print(gridrun.format_plan(specs, slots, args.lock_timeout, calibration))
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="Optuna sweep over a search space (ablations/sweeps/*.yaml); each trial is a run folder",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="sweep file or name (e.g. ablations/sweeps/heads_dk.yaml or heads_dk)")
    p.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: the file's)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: 1, or 1 per slot)")
    p.add_argument("--devices", default=None, help="the workers' slots: all, cpu:N, cuda:0,1 (as grid run)")
    p.add_argument(
        "--jobs-per-device",
        type=int,
        default=1,
        metavar="N",
        help="workers sharing each GPU (default 1); --workers defaults to GPUs x N",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="journal file, sqlite:///FILE or postgresql://USER@HOST/DB "
        "(default: $TLIT_SWEEP_STORAGE, else results/sweeps/<study>/journal.log)",
    )
    p.add_argument("--study", default=None, help="study name (default: the file's)")
    p.add_argument("--scale", default=None, help="scale: paper, small, tiny, ... (default: the file's)")
    p.add_argument("--runs", default="results/runs", help="root of the run folders")
    p.add_argument("--sweeps", default="results/sweeps", help="root of journals, reports and exported grids")
    p.add_argument("--report", action="store_true", help="best trials, importances and plots; runs nothing")
    p.add_argument("--export-best", action="store_true", help="best config as a grid file; runs nothing")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B (train.wandb=false)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # started by --workers
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: workers on this node's --devices; slurm: the workers as one SLURM job array",
    )
    _add_slurm_options(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help=f"{OVERRIDES_HELP}; they apply to every trial",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    import os

    from experiments.sweeps import file as sweep_file
    from experiments.sweeps import runner as sweeps
    from experiments.sweeps import storage as sweep_storage

    overrides = [*args.overrides, *(["train.wandb=false"] if args.no_wandb else [])]
    workers = _sweep_workers(args)  # every value is checked before the storage is touched
    spec = sweep_file.load_sweep(
        args.file,
        scale=args.scale,
        study=args.study,
        trials=args.trials,
        overrides=dict(C.parse_override(o) for o in overrides),
    )
    storage = args.storage or os.environ.get(sweeps.STORAGE_ENV)
    if args.worker is not None:
        url = storage or sweep_storage.default_storage(args.sweeps, spec.study)
        sweeps.run_worker(spec, sweep_storage.parse_storage(url), runs_root=args.runs, worker=args.worker)
        return 0
    if args.report or args.export_best:
        from experiments.sweeps import report as sweep_report

        study = sweep_report.load_study(spec, storage, args.sweeps)
        if args.trials is None:  # the budget the study was last run with, not the file's
            spec = dataclasses.replace(spec, trials=sweeps.requested_trials(study, spec.trials))
        if args.report:
            report = sweep_report.make_report(spec, study, args.sweeps)
            print(report.markdown)
            for path in report.files:
                print(f"wrote {path}", file=sys.stderr)
        if args.export_best:
            path = sweep_report.export_best(spec, study, args.sweeps)
            print(f"wrote {path}; run it with: tlit grid run {path} --scale {spec.scale} --seeds 3")
        return 0
    slurm = None
    if args.launcher == "slurm":
        from experiments.grids.runner import make_launcher

        folder = Path(args.slurm_folder) / "sweeps" / spec.study
        options = _slurm_options(args, folder, {spec.base_config().train.accelerator})
        if args.jobs_per_device != 1:
            raise ValueError(
                "--jobs-per-device: sweep workers on SLURM hold one GPU each; use it with --devices"
            )
        slurm = make_launcher("slurm", slurm=options, job_name=f"tlit-sweep-{spec.study}")
        slurm.wait = not args.no_wait
        slurm.preflight({spec.base_config().train.devices})
    return sweeps.run_sweep(
        spec,
        storage,
        workers=workers,
        devices=args.devices,
        jobs_per_device=args.jobs_per_device,
        runs_root=args.runs,
        sweeps_root=args.sweeps,
        overrides=overrides,
        out=sys.stdout,
        slurm=slurm,
    )


def _sweep_workers(args: argparse.Namespace) -> int:
    """``--workers`` checked against ``--devices`` (default: one per slot, or 1 without --devices)."""
    from experiments.launchers.local import parse_devices

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {args.workers}")
    if args.devices is None or args.launcher == "slurm":  # SLURM: one array task per worker, no local slots
        return 1 if args.workers is None else args.workers
    slots = len(parse_devices(args.devices, args.jobs_per_device))
    workers = slots if args.workers is None else args.workers
    if workers > slots:
        raise ValueError(
            f"--workers {workers} needs {workers} device slots; --devices {args.devices} gives {slots}"
        )
    return workers


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_eval,
    _add_data,
    _add_table,
    _add_grid,
    _add_sweep,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlit", description="Re-run, extend and trust Table 3 of 'Attention Is All You Need'."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)
    for add in COMMANDS:
        add(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    """Our loggers at INFO; Lightning keeps its own handler (no double lines) and its chatter is muted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lightning").propagate = False
    if not verbose:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        for pattern in (
            ".*Experiment logs directory .* exists and is not empty.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
            # our SLURM tasks start DDP without srun on purpose (experiments/launchers/slurm.py)
            ".*The `srun` command is available on your system but is not used.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"tlit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable path or a full disk: name the path, no traceback
        if args.verbose:
            raise
        print(f"tlit {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
