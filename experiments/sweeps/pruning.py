"""Optuna's Lightning pruning callback, reporting at optimizer steps; imported only by a training trial.

``optuna_integration.PyTorchLightningPruningCallback`` (5.0) imports ``lightning.pytorch`` and so works with
Lightning 2.6, but it reports at ``step=current_epoch``. Our runs are step-based (``max_epochs=-1``,
validation every ``train.val_every_n_steps`` optimizer steps), so several validations share an epoch and
Optuna would drop every report after the first of each epoch. This subclass reports at
``trainer.global_step`` (so a pruner's ``n_warmup_steps`` and ``min_resource`` count optimizer steps), skips
the final ``trainer.validate`` after fit, and remembers where it pruned for the run folder's
``pruned.json``. Sweeps run one device per trial, so the parent's DDP branch is never needed.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import optuna
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from optuna_integration import PyTorchLightningPruningCallback


class StepPruningCallback(PyTorchLightningPruningCallback):
    """Reports ``monitor`` (e.g. ``val/ppl``) after every validation during fit and prunes on request.

    Attributes:
        reported: step -> value of every report, in order.
        pruned_at: The optimizer step at which the trial was pruned, or None.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        super().__init__(trial, monitor)
        self.reported: dict[int, float] = {}
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            return  # e.g. val/bleu on a validation without BLEU
        value, step = float(metric), int(trainer.global_step)
        if not math.isfinite(value) or step in self.reported:
            return
        self.reported[step] = value
        self._trial.report(value, step=step)
        if self._trial.should_prune():
            self.pruned_at = step
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={value:.4g}")


def close_wandb(status: str) -> None:
    """Finish a W&B run left open by an interrupted fit: the next trial in this process must get its own run
    (Lightning's WandbLogger would otherwise reuse the open one)."""
    wandb: Any = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.run.summary["status"] = status
        wandb.finish(exit_code=0 if status == "pruned" else 1)
    except Exception:  # W&B is a sink; never fail a trial on it
        pass
