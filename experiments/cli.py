"""``tlit``: one command line for training, evaluation, grids, sweeps and tables. Thin: it parses arguments,
calls the library and prints; nothing heavy is imported before a subcommand needs it.

User errors (a bad config value, a missing file, an unknown grid) print one line and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from transformer_lit import config as C
from transformer_lit.errors import NonFiniteLossError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NonFiniteLossError)


def _sections_help() -> str:
    lines = ["config sections (override any field as section.field=value):"]
    for name, cls in C.SECTIONS.items():
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        lines.append(f"  {name}: {fields}")
    lines.append("examples: model.num_heads=16 model.d_k=32 train.max_steps=2000 data.corpus=text")
    return "\n".join(lines)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one run into its run folder",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grid", default="table3", help="grid file or name (default: table3)")
    p.add_argument("--row", default="base", help="row of the grid (default: base)")
    p.add_argument("--scale", default="tiny", help="scale: paper, small, tiny, ... (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: results/runs/<grid>/<scale>/<row>/seed<k>)")
    p.add_argument("--runs", default="results/runs", help="root of the run folders")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from experiments import grid as G
    from experiments import run as R

    grid = G.load_grid(args.grid)
    overrides = dict(C.parse_override(o) for o in args.overrides)
    cfg = grid.config(args.row, args.scale, args.seed, overrides)
    run_dir = Path(args.out) if args.out else G.run_dir_for(args.runs, grid.name, args.scale, args.row, args.seed)
    existing = R.read_summary(run_dir)
    if existing is not None and existing.get("status") == "complete":
        print(f"{run_dir} is already complete (summary.json present); nothing to do")
        return 0
    summary = R.train(cfg, run_dir, R.RunInfo(grid=grid.name, scale=args.scale, row=args.row))
    if summary:
        print(
            f"{run_dir}: ppl_dev={summary['ppl_dev']:.3f} bleu_dev={summary['bleu_dev']:.2f} "
            f"bleu_dev_tok={summary['bleu_dev_tok']:.2f} steps={summary['train_steps']} "
            f"params={summary['params']:,} wall={summary['wall_seconds']:.0f}s"
        )
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="decode a split of a run and score it (writes eval_<split>.json)")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--max-len-b", type=int, default=50)
    p.add_argument("--average", type=int, default=None, metavar="K", help="average the last K checkpoints")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("translate", help="translate stdin to stdout with a run's model")
    p.add_argument("run_dir")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--average", type=int, default=None, metavar="K")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("average", help="average the parameters of a run's last K checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--last", type=int, required=True, metavar="K")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_average)


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.evaluate import eval_run

    result = eval_run(
        args.run_dir, split=args.split, beam=args.beam, alpha=args.alpha, average=args.average,
        max_len_b=args.max_len_b,
    )
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from experiments.evaluate import translate_lines

    lines = [line.rstrip("\n") for line in sys.stdin]
    hyps = translate_lines(
        args.run_dir, lines, beam=args.beam, alpha=args.alpha, average=args.average, progress=not sys.stdin.isatty()
    )
    sys.stdout.write("".join(h + "\n" for h in hyps))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from experiments.evaluate import average_run

    path = average_run(args.run_dir, args.last, args.output)
    print(f"averaged the last {args.last} checkpoints of {args.run_dir} into {path}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the synthetic corpus, or download and prepare WMT14")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write the built-in synthetic corpus as text files")
    s.add_argument("--out", required=True)
    s.add_argument("--pairs", type=int, default=None, help="training pairs (default: data.synthetic_pairs)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)
    w = dsub.add_parser("wmt14", help="download and prepare WMT14 En-De (needs internet)")
    w.add_argument("--out", required=True)
    w.set_defaults(func=cmd_data_wmt14)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from transformer_lit.corpora import write_synthetic

    values: dict = {"data.synthetic_seed": args.seed}
    if args.pairs is not None:
        values["data.synthetic_pairs"] = args.pairs
    cfg = C.apply_overrides(C.base(), values).data
    for path in write_synthetic(args.out, cfg):
        print(path)
    return 0


def cmd_data_wmt14(args: argparse.Namespace) -> int:
    from transformer_lit.corpora import prepare_wmt14

    out = prepare_wmt14(args.out)
    print(f"WMT14 En-De prepared in {out}")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_eval, _add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlit", description="Re-run, extend and trust Table 3 of 'Attention Is All You Need'."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"tlit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
