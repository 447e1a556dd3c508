"""One epoch of the real DataModule on 2 CPU ranks (Lightning's ``ddp`` strategy, gloo), for test_data.py.

Run as a script (``python tests/ddp_data_worker.py OUT_DIR``) it prepares nothing itself: the DataModule
prepares the synthetic corpus on first use (local rank 0, under the preparation lock) and both ranks map
the result. Each rank writes ``OUT_DIR/rank{r}.json``: the pair positions of every training batch it
received, the folder it mapped and the class of its training data. Lightning starts rank 1 by running this
script again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from transformer_lit.config import DataConfig
from transformer_lit.data import TranslationDataModule

PAIRS = 600
"""Synthetic training pairs: a few dozen batches per epoch at ``MAX_TOKENS``."""
MAX_TOKENS = 400


def data_config(out_dir: Path) -> DataConfig:
    return DataConfig(
        synthetic_pairs=PAIRS, synthetic_eval_pairs=20, vocab_size=120, max_tokens=MAX_TOKENS, max_len=64,
        cache_dir=str(out_dir / "cache"),
    )  # fmt: skip


class Recorder(L.LightningModule):
    """Keeps the pair positions of every training batch; one parameter so that DDP has a gradient to sync."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return (self.w * batch["src"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dm = TranslationDataModule(data_config(out_dir), seed=7)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, default_root_dir=out_dir,
    )  # fmt: skip
    module = Recorder()
    trainer.fit(module, datamodule=dm)
    data = dm.train_data
    record = {
        "batches": module.seen,
        "folder": str(getattr(data, "folder", "")),
        "class": type(data).__name__,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
