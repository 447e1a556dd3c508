"""A GPU's measured training speed, for ``tlit grid plan --calibration FILE`` instead of the fixed CPU factor.

``bench/gpu_check.py`` writes the file (JSON) after measuring the GPU it runs on:

    {"device": "NVIDIA H200", "date": "...", "source": "bench/gpu_check.py",
     "throughput": [{"name": "tiny", "params": 1.2e6, "tokens_per_s": 4.1e5}, ...],
     "packing": {"1": 1.0, "2": 1.9, "4": 3.4, "8": 5.2}}

``throughput``: target tokens per second of one training process at a few model sizes. A small model
leaves most of a big GPU idle, so its seconds per (parameter x token) are higher than a big model's; a run
of another size takes the value interpolated in log(parameters) between the measured points (the nearest
one outside them). ``packing``: total throughput of n tiny one-GPU jobs sharing a GPU over that of one job;
a packed job then takes n / packing[n] times as long as alone (interpolated in n; missing: no gain).

No torch: planning imports this.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformer_lit.atomic import write_atomic


@dataclass(frozen=True)
class Calibration:
    """Measured speeds of one GPU model; see the module docstring."""

    device: str
    points: tuple[tuple[float, float], ...]
    """(parameters, seconds per parameter x target token), sorted by parameters."""
    packing: dict[int, float] = field(default_factory=dict)
    """Jobs per GPU -> total throughput relative to one job."""
    path: str = ""

    def seconds_per_param_token(self, params: float) -> float:
        xs = [math.log(p) for p, _ in self.points]
        x = math.log(max(1.0, params))
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return self.points[0][1]
        if i == len(xs):
            return self.points[-1][1]
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return self.points[i - 1][1] * (1 - w) + self.points[i][1] * w

    def packed_slowdown(self, per_device: int) -> float:
        """How much longer one job takes when ``per_device`` jobs share its GPU: n / speedup(n)."""
        if per_device <= 1:
            return 1.0
        known = sorted({1: 1.0, **self.packing}.items())
        ns = [n for n, _ in known]
        i = bisect.bisect_left(ns, per_device)
        if i < len(ns) and ns[i] == per_device:
            speedup = known[i][1]
        elif i == len(ns):  # beyond the measured packings: no more gain than the last one
            speedup = known[-1][1]
        else:
            (n0, s0), (n1, s1) = known[i - 1], known[i]
            speedup = s0 + (s1 - s0) * (per_device - n0) / (n1 - n0)
        return per_device / max(speedup, 1e-9)


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"--calibration {path}: {what} (bench/gpu_check.py writes this file)")


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; a missing or malformed one is a one-line ValueError naming the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--calibration {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"not a JSON file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise _bad(path, "expected a JSON object")
    rows = data.get("throughput")
    if not isinstance(rows, list) or not rows:
        raise _bad(path, "throughput must be a non-empty list of {params, tokens_per_s}")
    points = []
    for i, row in enumerate(rows):
        params = row.get("params") if isinstance(row, dict) else None
        speed = row.get("tokens_per_s") if isinstance(row, dict) else None
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (params, speed)):
            raise _bad(path, f"throughput[{i}] needs positive numbers params and tokens_per_s, got {row!r}")
        points.append((float(params), 1.0 / (float(params) * float(speed))))
    packing: dict[int, float] = {}
    for key, value in (data.get("packing") or {}).items():
        if not (str(key).isdigit() and int(key) > 0 and isinstance(value, int | float) and value > 0):
            raise _bad(path, f"packing must map jobs per GPU (1, 2, ...) to positive speedups, got {key!r}")
        packing[int(key)] = float(value)
    device = data.get("device")
    return Calibration(str(device or "GPU"), tuple(sorted(points)), packing, str(path))


def write_calibration(path: str | Path, device: str, throughput: list[dict[str, Any]], packing: dict) -> None:
    """Write what ``load_calibration`` reads (``bench/gpu_check.py``)."""
    data = {
        "device": device,
        "source": "bench/gpu_check.py",
        "throughput": throughput,
        "packing": {str(k): v for k, v in packing.items()},
    }
    write_atomic(path, json.dumps(data, indent=1) + "\n")
