"""The run's progress bar counts optimizer steps ("step 6/6"), not Lightning's "Epoch 0/-2"."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiments.runs.progress import StepProgressBar


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_counts_optimizer_steps_across_accumulation(tmp_path) -> None:
    bar = StepProgressBar(leave=True)
    trainer = L.Trainer(
        max_steps=6,
        max_epochs=-1,
        accumulate_grad_batches=2,  # 12 batches make 6 steps: the bar must say 6/6, not 12
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(5, 2)), batch_size=1)  # epochs of 5 batches: not a step count
    trainer.fit(Tiny(), data)
    task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    assert task.description.strip() == "step"
    assert (task.completed, task.total) == (6, 6)
