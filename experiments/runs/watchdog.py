"""The stall watchdog: a run that makes no progress is killed, so that its launcher retries it like a crash.

A DDP run whose rank died on another node, or hangs (a stuck device, a stopped process), leaves the other
ranks waiting in a collective: no error, no exit, a slot held for hours. Every training process (each
rank) runs a ``StallWatchdog`` callback: a daemon thread that notes the time of each training and validation
batch, and when none has come for ``train.stall_timeout`` minutes it prints one line (``stalled: ...``,
which the launcher's ``failed.json`` and the grid's result line quote), SIGKILLs the processes it started
(Lightning's DDP ranks on this node, stopped ones included) and exits with ``EXIT_STALLED``. The launcher
(local, SLURM, a sweep's worker supervisor) sees a failed attempt and retries it; the retry resumes from the
last checkpoint. A same-node rank that is SIGKILLed needs no watchdog: gloo/NCCL see the closed connection
and Lightning's own observer kills the rest at once.

Why a thread in the child rather than the launcher: every way a run is started (``tlit train``, the local
and SLURM launchers, sweep trials in their worker) gets it, and only the training process knows what a step
is. Collectives release the GIL while they wait, so the thread runs while the main thread is stuck. The
clock starts when training starts (data preparation and the final decode are not watched) and stops at its
end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L

EXIT_STALLED = 75
"""Exit status of a stalled run (EX_TEMPFAIL: try again); not ``USER_ERROR_EXIT``, so it is retried."""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), read from ``/proc``; empty where that is unavailable."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found += kids
                    todo += kids
    return found


class StallWatchdog(L.Callback):
    """Kill this training process and its ranks after ``minutes`` without a training or validation batch.

    Args:
        minutes: ``train.stall_timeout``; None disables the watchdog.
        check_every: seconds between two looks (default: a tenth of the timeout, at most 30 s).
    """

    def __init__(self, minutes: float | None, check_every: float | None = None) -> None:
        self.seconds = None if minutes is None else 60.0 * minutes
        self.minutes = minutes
        self.check_every = check_every or (min(30.0, self.seconds / 10) if self.seconds else 30.0)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tick(self, *_: Any) -> None:
        self._last = time.monotonic()

    on_train_batch_end = _tick
    on_validation_batch_end = _tick
    on_validation_start = _tick

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds is None or self._thread is not None:
            return
        self._tick()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="tlit-stall-watchdog", daemon=True)
        self._thread.start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._halt()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._halt()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def _watch(self) -> None:
        assert self.seconds is not None
        while not self._stop.wait(self.check_every):
            idle = time.monotonic() - self._last
            if idle > self.seconds:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        """One line to the log, SIGKILL to the ranks this process started, then exit at once (the main
        thread is stuck: no clean-up can run, and none is needed; the last checkpoint is whole)."""
        kids = descendants(os.getpid())
        line = (
            f"stalled: no training step for {idle / 60:.1f} min (train.stall_timeout={self.minutes}); "
            f"killing pid {os.getpid()}"
            + (f" and its processes {kids}" if kids else "")
            + " so that it is retried"
        )
        with contextlib.suppress(OSError):
            os.write(2, f"\n{line}\n".encode())
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(EXIT_STALLED)
