"""Run one config into its run folder: train, evaluate on dev, write ``summary.json`` last.

The run folder is the contract between training, tables and sweeps (docs/DESIGN.md)::

    config.yaml        the resolved config        metrics.csv      Lightning CSV log
    run.json           grid, scale, row           hyps_dev.txt     dev hypotheses of the final BLEU
    checkpoints/       last.ckpt, step=NNNNNNN.ckpt, tokenizer.model
    summary.json       written last and atomically: its presence means "complete"

The config is resolved once, by the process that plans the run (``plan``: a grid, ``tlit train --grid``, a
sweep worker); a training process started by a launcher reads it back (``planned``). Idempotent: a complete
run is skipped, a killed run resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runs.folder import RunInfo, read_info, write_atomic, write_info, write_json_atomic
from transformer_lit import config as C

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
FAILED = "failed.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where and how a run executes, not what it computes: a run may resume with other values of these.
RUNTIME_FIELDS = frozenset(
    {
        "train.accelerator",
        "train.compile",
        "train.loss_chunk_tokens",
        "train.num_threads",
        "train.progress_bar",
        "train.wandb",
        "train.wandb_project",
        "data.num_workers",
        "data.cache_dir",
    }
)


class RunFolderConflict(ValueError):
    """The run folder already holds a different config."""


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_config(run_dir: Path, cfg: C.RunConfig) -> bool:
    """Whether ``run_dir`` needs ``cfg`` written: True when it has no config.yaml or one that differs only in
    RUNTIME_FIELDS; refuses a folder that holds another config (``RunFolderConflict``)."""
    path = run_dir / CONFIG
    if not path.is_file():
        return True
    old = C.flat_dict(C.load_yaml(path))
    new = C.flat_dict(cfg)
    diff = [k for k in new if old.get(k) != new[k] and k not in RUNTIME_FIELDS]
    if diff:
        k = diff[0]
        raise RunFolderConflict(
            f"{run_dir} holds a run with a different config ({k}: {old.get(k)!r} there, {new[k]!r} now); "
            "use another --out or delete that folder"
        )
    return old != new


def check_or_write_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """First run: write config.yaml. Later runs: it must be the same config (up to RUNTIME_FIELDS, which are
    updated), or the folder is refused."""
    if check_config(run_dir, cfg):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / CONFIG, C.to_yaml(cfg))


def plan(run_dir: Path, cfg: C.RunConfig, info: RunInfo) -> None:
    """In the process that plans the run: write its resolved config (config.yaml) and names (run.json).
    The training process reads both (``planned``) and never resolves the config again."""
    check_or_write_config(run_dir, cfg)
    write_info(run_dir, info)


def planned(run_dir: Path, runtime: Sequence[str] = ()) -> tuple[C.RunConfig, RunInfo]:
    """In the training process: the config and names the planner wrote, with run-time overrides (where the
    run executes: RUNTIME_FIELDS) applied. Any other override would change the run: refused."""
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {CONFIG}; plan the run first (tlit grid run, or tlit train --row --scale)"
        )
    values = dict(C.parse_override(o) for o in runtime)
    for key in values:
        if key not in RUNTIME_FIELDS:
            raise ValueError(
                f"{key} would change the planned run in {run_dir}; tlit train --run-dir takes only run-time "
                f"overrides: {', '.join(sorted(RUNTIME_FIELDS))}"
            )
    return C.apply_overrides(C.load_yaml(run_dir / CONFIG), values), read_info(run_dir)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("transformer_lit", "torch", "lightning", "sacrebleu", "sentencepiece", "wandb"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def train(
    cfg: C.RunConfig, run_dir: str | Path, info: RunInfo | None = None, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return its summary; a complete run returns its summary at once.

    ``callbacks`` are extra Lightning callbacks (a sweep's pruning callback)."""
    info = info or RunInfo()
    run_dir = Path(run_dir)
    done = read_summary(run_dir)
    if done is not None and done.get("status") == "complete":
        log.info("%s is already complete; nothing to do", run_dir)
        return done
    from experiments.runs.trainer import check_accelerator, fit_and_evaluate  # torch only once there is work

    check_accelerator(cfg)
    plan(run_dir, cfg, info)  # a no-op for a planned run, unless run-time fields changed
    summary = fit_and_evaluate(cfg, run_dir, info, callbacks or [])
    if summary is not None:
        summary.update(git_sha=git_sha(), versions=versions())
        write_json_atomic(run_dir / SUMMARY, summary)
        (run_dir / FAILED).unlink(missing_ok=True)
    return summary or {}


def mark_failed(run_dir: Path, message: str, log_tail: str = "") -> None:
    write_json_atomic(
        Path(run_dir) / FAILED,
        {"status": "failed", "error": message, "log_tail": log_tail, "time": time.time()},
    )
