"""Run one config into its run folder: train, evaluate on dev, write ``summary.json`` last.

The run folder is the contract between training, tables and sweeps (docs/DESIGN.md)::

    config.yaml        the resolved config        metrics.csv      Lightning CSV log
    checkpoints/       last.ckpt, step=NNNNNNN.ckpt, tokenizer.model
    hyps_dev.txt       dev hypotheses of the final BLEU (for significance tests)
    summary.json       written last and atomically: its presence means "complete"

Idempotent: a complete run is skipped, a killed run resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class RunInfo:
    """Names of a run, stored in summary.json and used as W&B group/job_type."""

    grid: str = "adhoc"
    scale: str = "custom"
    row: str = "base"

    @property
    def group(self) -> str:
        return f"{self.grid}/{self.scale}"


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def no_gpu_message(what: str, instead: str) -> str:
    """The one line of every GPU request on a machine without one (``--devices cuda:...``,
    ``train.accelerator=gpu``)."""
    return f"{what}: no GPU is visible here; use {instead}"


def check_or_write_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """First run: write config.yaml. Later runs: it must be the same config (up to RUNTIME_FIELDS, which are
    updated), or the folder is refused."""
    path = run_dir / CONFIG
    if path.is_file():
        old = C.flat_dict(C.load_yaml(path))
        new = C.flat_dict(cfg)
        diff = [k for k in new if old.get(k) != new[k] and k not in RUNTIME_FIELDS]
        if diff:
            k = diff[0]
            raise RunFolderConflict(
                f"{run_dir} holds a run with a different config ({k}: {old.get(k)!r} there, {new[k]!r} now); "
                "use another --out or delete that folder"
            )
        if old == new:
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    C.dump_yaml(cfg, path)


def accumulation(cfg: C.RunConfig, world_size: int) -> int:
    """Batches per optimizer step so that one update holds about optim.tokens_per_update tokens."""
    if cfg.optim.tokens_per_update is None:
        return 1
    return max(1, math.ceil(cfg.optim.tokens_per_update / (cfg.data.max_tokens * world_size)))


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


def device_name(trainer: Any) -> str:
    import torch

    if trainer.strategy.root_device.type == "cuda":
        return f"{trainer.num_devices}x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    return f"cpu ({torch.get_num_threads()} threads) x{trainer.num_devices}"


def configure_wandb_mode() -> None:
    """Offline unless the user is logged in; an explicit WANDB_MODE always wins (docs/DESIGN.md, field
    notes)."""
    if os.environ.get("WANDB_MODE"):
        return
    logged_in = bool(os.environ.get("WANDB_API_KEY"))
    if not logged_in:
        import netrc

        try:
            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
    os.environ["WANDB_MODE"] = "online" if logged_in else "offline"


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
    check_or_write_config(run_dir, cfg)
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
