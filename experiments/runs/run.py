"""Run one config into its run folder: train, evaluate on dev, write the summary last.

The run folder's files and states are ``experiments.runs.folder``'s (docs/DESIGN.md, "Run folder").
The config is resolved once, by the process that plans the run (``plan``: a grid, ``tlit train --grid``, a
sweep worker); a training process started by a launcher reads it back (``planned``). Idempotent: a complete
run with the same config is returned as it is, an interrupted one resumes from its last readable checkpoint,
and a folder holding another run (or a damaged one) is refused in one line.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runs import folder as RF
from experiments.runs.folder import RUNTIME_FIELDS, RunFolderConflict, RunInfo
from transformer_lit import config as C

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def check_config(run_dir: Path, cfg: C.RunConfig) -> bool:
    """Whether ``run_dir`` needs ``cfg`` written: True when it has no config.yaml or one that differs only in
    RUNTIME_FIELDS; refuses a folder that holds another config (``RunFolderConflict``)."""
    status = RF.classify(run_dir, expected=cfg, check_lock=False)
    if status.state in (RF.RunState.CONFLICT, RF.RunState.CORRUPT) and status.where == run_dir / RF.CONFIG:
        raise RunFolderConflict(status.refusal(run_dir))
    return status.config != cfg


def check_or_write_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """First run: write config.yaml. Later runs: it must be the same config (up to RUNTIME_FIELDS, which are
    updated), or the folder is refused."""
    if check_config(run_dir, cfg):
        RF.write_config(run_dir, cfg)


def plan(run_dir: Path, cfg: C.RunConfig, info: RunInfo) -> None:
    """In the process that plans the run: write its resolved config (config.yaml) and names (run.json).
    The training process reads both (``planned``) and never resolves the config again."""
    check_or_write_config(run_dir, cfg)
    RF.write_info(run_dir, info)


def planned(run_dir: Path, runtime: Sequence[str] = ()) -> tuple[C.RunConfig, RunInfo]:
    """In the training process: the config and names the planner wrote, with run-time overrides (where the
    run executes: RUNTIME_FIELDS) applied. Any other override would change the run: refused."""
    if not (run_dir / RF.CONFIG).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {RF.CONFIG}; plan the run first (tlit grid run, or tlit train --row --scale)"
        )
    values = dict(C.parse_override(o) for o in runtime)
    for key in values:
        if key not in RUNTIME_FIELDS:
            raise ValueError(
                f"{key} would change the planned run in {run_dir}; tlit train --run-dir takes only run-time "
                f"overrides: {', '.join(sorted(RUNTIME_FIELDS))}"
            )
    return C.apply_overrides(C.load_yaml(run_dir / RF.CONFIG), values), RF.read_info(run_dir)


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
    status = RF.classify(run_dir, expected=cfg, check_lock=False)  # our caller holds the lock, if any
    if status.state in (RF.RunState.CONFLICT, RF.RunState.CORRUPT):
        raise RunFolderConflict(status.refusal(run_dir))
    if status.state is RF.RunState.COMPLETE:
        log.info("%s is already complete; nothing to do", run_dir)
        return status.summary or {}
    from experiments.runs.trainer import check_accelerator, fit_and_evaluate  # torch only once there is work

    check_accelerator(cfg)
    plan(run_dir, cfg, info)  # a no-op for a planned run, unless run-time fields changed
    summary = fit_and_evaluate(cfg, run_dir, info, callbacks or [])
    if summary is not None:
        summary.update(git_sha=git_sha(), versions=versions())
        RF.write_summary(run_dir, summary)
    return summary or {}
