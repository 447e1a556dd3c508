"""A progress bar that counts optimizer steps, because a run is step-based, not epoch-based.

Lightning's bar counts batches of an epoch and titles itself "Epoch 0/-2" when ``max_epochs=-1``: it shows
neither how far the run is nor when it ends. This one shows ``step 350/700`` with the elapsed time and an
ETA, and keeps counting across a resume (it starts at the checkpoint's step).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich bar over ``trainer.global_step / trainer.max_steps`` (optimizer steps, after accumulation)."""

    @property
    def total_train_batches(self) -> int | float:  # the bar's total: optimizer steps of the whole run
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
