"""The SLURM path on the one-node test cluster: how long the cluster takes to start, how long the ``slurm``
tests take, and the requeue latency (``scontrol requeue`` -> the task's first new training step).

Run as root from the repository root: ``.venv/bin/python bench/slurm_cluster.py [--restart] [--no-tests]``

- ``--restart``: stop the cluster (``scripts/slurm-cluster.sh down``: it cancels the cluster's jobs) and time
  ``up`` (the packages already installed; a fresh machine adds the apt install, timed once by hand).
- the tests: ``pytest -m slurm tests/`` with ``-s``; the requeue latency is the line that
  ``test_preempted_task_resumes_from_its_checkpoint_both_ways`` prints.

Prints the figures and the load average, and as its LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restart", action="store_true", help="time down + up (cancels the cluster's jobs)")
    parser.add_argument("--no-tests", action="store_true", help="only the cluster start")
    args = parser.parse_args()
    result: dict[str, float | str | None] = {"load_before": load()}
    if args.restart:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, check=True)
    seconds, up = timed(["bash", str(SCRIPT), "up"])
    if up.returncode != 0:
        print(up.stderr, file=sys.stderr)
        return 1
    result["cluster_up_s"] = round(seconds, 1)
    result["cluster_was_up"] = "already up" in up.stderr
    print(f"cluster up: {seconds:.1f} s ({up.stderr.strip().splitlines()[-1]})")
    if not args.no_tests:
        conf = subprocess.run(["bash", str(SCRIPT), "conf"], capture_output=True, text=True).stdout.strip()
        env = {**os.environ, "SLURM_CONF": conf, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "-m", "slurm", "tests/"]
        seconds, tests = timed(cmd, cwd=ROOT, env=env)
        summary = [line for line in tests.stdout.splitlines() if " passed" in line or " failed" in line]
        latency = re.search(r"requeue latency \(.*\): ([\d.]+) s", tests.stdout)
        result.update(
            slurm_tests_s=round(seconds, 1),
            slurm_tests=summary[-1].strip("= ") if summary else "no summary",
            requeue_latency_s=float(latency.group(1)) if latency else None,
        )
        print(f"slurm tests: {seconds:.0f} s ({result['slurm_tests']})")
        print(
            f"requeue latency (scontrol requeue -> first new training step): {result['requeue_latency_s']} s"
        )
    result["load_after"] = load()
    print(f"load average: {result['load_before']} before, {result['load_after']} after")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
