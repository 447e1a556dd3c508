"""The run folder's files that say what a run is, written by the process that plans it (docs/DESIGN.md).

    config.yaml   the resolved config: the training process reads it, it never rebuilds it
    run.json      who the run is (grid, scale, row): summary.json and W&B names

Both are written atomically (temporary file, then rename), so a training process started at any moment
reads a whole file. No torch here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUN_INFO = "run.json"


@dataclass(frozen=True)
class RunInfo:
    """Names of a run, stored in run.json and summary.json and used as W&B group/job_type."""

    grid: str = "adhoc"
    scale: str = "custom"
    row: str = "base"

    @property
    def group(self) -> str:
        return f"{self.grid}/{self.scale}"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_info(run_dir: Path, info: RunInfo) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_INFO, asdict(info))


def read_info(run_dir: Path) -> RunInfo:
    """The run's names; a folder planned before run.json existed gets the defaults (adhoc/custom/base)."""
    path = run_dir / RUN_INFO
    if not path.is_file():
        return RunInfo()
    try:
        data = json.loads(path.read_text())
        return RunInfo(**{k: str(data[k]) for k in ("grid", "scale", "row")})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run.json (grid, scale, row): {err}") from None
