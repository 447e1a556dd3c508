"""Micro-batches of uneven size and a gradient-recording module, for the loss-normalisation tests.

Run as a script (``python tests/ddp_loss_worker.py OUT_DIR``) it trains one optimizer update on 2 CPU ranks
with Lightning's ``ddp`` strategy (gloo), exactly as ``experiments.trainer`` builds it, each rank taking
``PER_RANK`` accumulated micro-batches; each rank saves the gradients its optimizer received to
``OUT_DIR/grads_rank{r}.pt``. Lightning starts rank 1 by running this script again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from transformer_lit import config as C
from transformer_lit.lit_module import TransformerLitModule

VOCAB, PAD, BOS, EOS = 30, 0, 2, 3
PER_RANK = 2
TINY = {
    "model.num_layers": 1,
    "model.d_model": 16,
    "model.d_ff": 32,
    "model.num_heads": 2,
    "model.d_k": 8,
    "model.d_v": 8,
    "model.dropout": 0.0,
    "train.wandb": False,
    "train.progress_bar": False,
}
# (sentences, longest source, longest target) per micro-batch: 1 to 40 target tokens, so that averaging the
# micro-batches' means would weigh a token of the 1-sentence batch ~20x more than one of the largest.
SHAPES = [(1, 3, 1), (5, 7, 8), (2, 4, 3), (4, 9, 10)]


def micro_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches shaped as ``EncodedPairs`` makes them, with ragged lengths (so every batch holds PAD)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, s, t in SHAPES:
        src_lens = torch.randint(1, s + 1, (b,), generator=gen)
        src_lens[0] = s
        tgt_lens = torch.randint(1, t + 1, (b,), generator=gen)
        tgt_lens[-1] = t
        src = torch.randint(4, VOCAB, (b, s), generator=gen)  # (b, s)
        src[torch.arange(s)[None, :] >= src_lens[:, None]] = PAD
        src[torch.arange(b), src_lens - 1] = EOS
        words = torch.randint(4, VOCAB, (b, t), generator=gen)  # (b, t)
        tgt_out = torch.where(torch.arange(t)[None, :] < tgt_lens[:, None] - 1, words, PAD)  # (b, t)
        tgt_out[torch.arange(b), tgt_lens - 1] = EOS
        tgt_in = torch.cat([torch.full((b, 1), BOS), tgt_out[:, :-1]], dim=1)  # (b, t)
        tgt_in[tgt_in.eq(EOS)] = PAD
        out.append({"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "index": torch.arange(b)})
    return out


def one_batch(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """All micro-batches in one batch, right-padded to the longest source and target."""

    def stack(key: str) -> torch.Tensor:
        width = max(b[key].size(1) for b in batches)
        return torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].size(1))) for b in batches])

    return {key: stack(key) for key in ("src", "tgt_in", "tgt_out")}  # (sum b, max s) / (sum b, max t)


def config(**overrides) -> C.RunConfig:
    return C.apply_overrides(C.base(), {**TINY, **overrides})


class GradRecorder(torch.optim.Optimizer):
    """Runs Lightning's closure like any optimizer, keeps the gradients it would apply, changes no weight."""

    def __init__(self, params) -> None:
        super().__init__(list(params), {"lr": 0.0})  # lr: logged by the module
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return loss


class GradProbe(TransformerLitModule):
    """The real module with the recording optimizer in place of Adam."""

    def configure_optimizers(self):  # type: ignore[override]
        self.recorder = GradRecorder(self.model.parameters())
        return self.recorder


def trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, **kw,
    )  # fmt: skip


class _RankShare(L.LightningDataModule):
    """Rank r trains on micro-batches r * PER_RANK .. (r + 1) * PER_RANK - 1."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        mine = micro_batches()[rank * PER_RANK : (rank + 1) * PER_RANK]
        return DataLoader(mine, batch_size=None)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = GradProbe(config(), vocab_size=VOCAB, pad_id=PAD)
    t = trainer(devices=2, strategy="ddp", accumulate_grad_batches=PER_RANK)
    t.fit(module, datamodule=_RankShare())
    torch.save(module.recorder.grads[0], out_dir / f"grads_rank{t.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
