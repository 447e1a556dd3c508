"""A failed run says why (issue 12, "Should fix"): the grid's result line and ``failed.json`` carry the
log's first error line, not only "exited with status 1"; a run that cannot even start because the disk is
full keeps what its earlier attempt said. Real processes on the local launcher; the full disk is a real
8 MB tmpfs (root only, ``small_disk`` in conftest.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.launchers import base as B
from experiments.launchers.local import LocalLauncher, Slots
from experiments.runs import folder as RF

FAILS = """
import sys
print("loading the data", flush=True)
def load():
    raise ValueError("data.train: no file /nowhere/train.en")
load()
"""

FAILS_THEN_FILLS = """
import os, sys
run_dir = sys.argv[1]
print("Traceback (most recent call last):", flush=True)
print("RuntimeError: out of patience", flush=True)
log = os.path.join(run_dir, "train.log")
with open(log, "ab") as f:  # pad the log to a whole page: the next header needs a new one
    f.write(b"." * (-os.path.getsize(log) % 4096))
with open(os.path.join(run_dir, "filler"), "wb") as f:  # then fill the disk
    try:
        while True:
            f.write(b"\\0" * 65536)
            f.flush()
    except OSError:
        pass
sys.exit(1)
"""


def cpu(n: int = 1) -> Slots:
    return Slots("cpu", tuple(f"cpu{i}" for i in range(n)))


def test_the_first_error_line_is_in_the_result_and_failed_json(tmp_path: Path):
    run_dir = tmp_path / "run"
    job = B.Job("g/s/A1/seed0", [sys.executable, "-c", FAILS], run_dir)
    [result] = LocalLauncher(slots=cpu(), retries=1, poll=0.05).run([job])
    assert result.state is B.JobState.FAILED and result.attempts == 2
    assert result.message == "exited with status 1: ValueError: data.train: no file /nowhere/train.en"
    failed = json.loads((run_dir / RF.FAILED).read_text())
    assert failed["error"] == result.message and "loading the data" in failed["log_tail"]
    assert RF.classify(run_dir).detail == result.message  # what tlit grid status shows


def test_error_line_reads_only_the_last_attempt_and_ddp_prefixes(tmp_path: Path):
    log = tmp_path / RF.LOG
    log.write_text(
        f"\n{B.ATTEMPT_HEADER}x attempt 1/2 ===\nKeyError: 'old'\n"
        f"\n{B.ATTEMPT_HEADER}x attempt 2/2 ===\nsome output\n"
        "[rank1]: torch.distributed.DistBackendError: Connection reset by peer\nValueError: later\n"
    )
    assert B.error_line(log) == "torch.distributed.DistBackendError: Connection reset by peer"
    log.write_text(
        f"{B.ATTEMPT_HEADER}x ===\ntlit train: error: model.d_k must be a positive integer, got 0\n"
    )
    assert B.error_line(log) == "tlit train: error: model.d_k must be a positive integer, got 0"
    log.write_text("all fine\n")
    assert B.error_line(log) == "" and B.failure_message(1, tmp_path) == "exited with status 1"


def test_a_start_on_a_full_disk_keeps_what_the_earlier_attempt_said(small_disk: Path):
    """The probe: on a full disk the retry could not write its log header; failed.json then said only
    "could not start: [Errno 28] No space left on device" with an empty log tail."""
    run_dir = small_disk / "run"
    job = B.Job("g/s/A1/seed0", [sys.executable, "-c", FAILS_THEN_FILLS, str(run_dir)], run_dir)
    [result] = LocalLauncher(slots=cpu(), retries=1, poll=0.05).run([job])
    assert result.state is B.JobState.FAILED, result
    assert result.message == (
        f"could not start: {run_dir / RF.LOG}: No space left on device; "
        "the attempt before: RuntimeError: out of patience"
    ), result.message
    assert "RuntimeError: out of patience" in (run_dir / RF.LOG).read_text()  # the log is untouched
    (run_dir / "filler").unlink()  # space again: a later failure verdict keeps the earlier tail
    B.start_failure(job, OSError(28, "No space left on device", str(run_dir / RF.LOG)))
    failed = json.loads((run_dir / RF.FAILED).read_text())
    assert "RuntimeError: out of patience" in failed["log_tail"] and "the attempt before" in failed["error"]
