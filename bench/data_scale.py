"""Data at the users' scale (issue 13): prepare a 1M-pair corpus once, then time and weigh runs that map it.

Corpus: ../shared/data/europarl_v7_deen_first20k repeated 50 times (1,000,000 pairs), each copy's lines
made distinct by its copy number, written to a temporary folder; dev: the first 300 lines of newstest2013
(a run's final BLEU decodes the whole dev set, which would otherwise dominate these short runs). Every run
is ``tlit train --scale tiny`` for 2 steps with ``data.vocab_size=8000``, in its own process.

Figures, each with the 1-minute load average when it was taken (the machine is shared by other agents):
  prepare   ``tlit data prepare``: wall time (BPE training + encoding + writing + planning the training
            batches), pairs/s, and the log's encoding and planning times
  run       a run on the prepared corpus: set-up (process start to its "first training step" log line),
            "data ready" from its log, peak RSS (``wait4``)
  baseline  the same run on a 1,000-pair corpus: the peak RSS of a run without (much) training data
  before    with ``--before DIR`` (the code before issue 13, e.g. ``git archive 6c5bd61 | tar -x -C DIR``):
            the same run on the 1M corpus, its vocabulary already cached, as every run did it then
  ddp       the same run with ``train.devices=2`` (gloo): each rank's PSS (``/proc/PID/smaps_rollup``,
            sampled, max), which splits the shared mapped pages between the ranks where RSS counts them twice
Goals (issue 13): data set-up <= 5 s, peak RSS <= 100 MB above the baseline, preparation <= 90 s on 2 cores.

    python bench/data_scale.py [--before DIR] [--copies 50] [--keep DIR]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EUROPARL = SHARED / "europarl_v7_deen_first20k" / "train"
NEWSTEST2013 = SHARED / "wmt_newstest_deen" / "newstest2013"
TLIT = Path(sys.executable).with_name("tlit")  # a script: Lightning's DDP re-runs sys.argv for rank 1


def build_corpus(out: Path, copies: int) -> int:
    """Europarl's 20k pairs ``copies`` times, the copy number appended to every line; returns the pairs."""
    n = 0
    for lang in ("en", "de"):
        lines = Path(f"{EUROPARL}.{lang}").read_text("utf-8").splitlines()
        with open(out / f"train.{lang}", "w", encoding="utf-8") as f:
            for k in range(copies):
                f.write("".join(f"{line} ({k})\n" for line in lines))
        n = len(lines) * copies
        small = lines[:1000]
        (out / f"small.{lang}").write_text("".join(f"{line}\n" for line in small), encoding="utf-8")
        dev = Path(f"{NEWSTEST2013}.{lang}").read_text("utf-8").splitlines()[:300]
        (out / f"dev.{lang}").write_text("".join(f"{line}\n" for line in dev), encoding="utf-8")
    return n


def overrides(tmp: Path, train: str) -> list[str]:
    return [
        "data.corpus=text", f"data.train=[{tmp / train}]", f"data.dev={tmp / 'dev'}", "data.vocab_size=8000",
        f"data.cache_dir={tmp / 'cache'}", "train.max_steps=2", "train.wandb=false",
        "train.progress_bar=false", "eval.beam_size=1",
    ]  # fmt: skip


class Child:
    """A ``tlit`` process: stderr lines timestamped from its start, its peak RSS, its ranks' PSS."""

    def __init__(self, args: list[str], code: Path = REPO, sample_pss: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
        self.lines: list[tuple[float, str]] = []
        self.pss: dict[int, int] = {}
        self.load = os.getloadavg()[0]
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(TLIT), *args], cwd=code, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True) if sample_pss else None
        if self._sampler:
            self._sampler.start()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.wall = time.perf_counter() - self.start
        self.peak_rss_mb = usage.ru_maxrss / 1024  # kB on Linux
        self._reader.join()
        if self.proc.returncode != 0:
            tail = "".join(line for _, line in self.lines[-30:])
            raise RuntimeError(f"tlit {' '.join(args[:2])} exited with {self.proc.returncode}:\n{tail}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.start, line))

    def _sample(self) -> None:
        while self.proc.returncode is None:
            for pid in [self.proc.pid, *children(self.proc.pid)]:
                self.pss[pid] = max(self.pss.get(pid, 0), pss_kb(pid))
            time.sleep(0.2)

    def seconds_until(self, pattern: str) -> float | None:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)

    def logged(self, pattern: str) -> str | None:
        return next((m.group(1) for _, line in self.lines if (m := re.search(pattern, line))), None)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def run_figures(child: Child) -> dict:
    return {
        "setup_s": round(child.seconds_until(r"first training step") or float("nan"), 2),
        "data_ready_s": float(child.logged(r"data ready in ([\d.]+) s") or "nan"),
        "peak_rss_mb": round(child.peak_rss_mb, 1),
        "wall_s": round(child.wall, 1),
        "load1": round(child.load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=50, help="copies of the 20k Europarl pairs (50: 1M)")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of the code before issue 13")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="data_scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pairs = build_corpus(tmp, args.copies)
    print(f"corpus: {pairs} pairs in {tmp} ({time.perf_counter() - started:.1f} s)", flush=True)
    result: dict = {"pairs": pairs, "cores": len(os.sched_getaffinity(0))}

    prep = Child(["data", "prepare", "--scale", "tiny", *overrides(tmp, "train")])
    result["prepare"] = {
        "wall_s": round(prep.wall, 1),
        "pairs_per_s": round(pairs / prep.wall),
        "encoding_s": float(prep.logged(r"\(encoding ([\d.]+) s") or "nan"),
        "plan_s": float(prep.logged(r"planned \d+ training batches of max_tokens=\d+ in ([\d.]+)") or "nan"),
        "peak_rss_mb": round(prep.peak_rss_mb, 1),
        "load1": round(prep.load, 2),
    }
    print("prepare", result["prepare"], flush=True)
    Child(["data", "prepare", "--scale", "tiny", *overrides(tmp, "small")])
    for name, train, extra in (
        ("baseline", "small", []),
        ("run", "train", []),
        ("run_again", "train", []),
        ("ddp", "train", ["train.devices=2", "train.accelerator=cpu"]),
    ):
        out = ["train", "--scale", "tiny", "--out", str(tmp / "runs" / name), *overrides(tmp, train), *extra]
        child = Child(out, sample_pss=name == "ddp")
        result[name] = run_figures(child)
        if name == "ddp":
            result[name]["pss_mb"] = sorted(round(kb / 1024, 1) for kb in child.pss.values() if kb)
        print(name, result[name], flush=True)
    if args.before:
        out = ["train", "--scale", "tiny", "--out", str(tmp / "runs" / "before"), *overrides(tmp, "train")]
        result["before"] = run_figures(Child(out, code=args.before.resolve()))
        print("before", result["before"], flush=True)
    result["rss_above_baseline_mb"] = round(
        result["run"]["peak_rss_mb"] - result["baseline"]["peak_rss_mb"], 1
    )
    result["goals"] = {
        "data_ready_le_5s": result["run"]["data_ready_s"] <= 5,
        "rss_above_baseline_le_100mb": result["rss_above_baseline_mb"] <= 100,
        "prepare_le_90s": result["prepare"]["wall_s"] <= 90,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
