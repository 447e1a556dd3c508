"""Lightning glue: the paper's loss, optimiser and schedule around ``Transformer``; dev PPL and BLEU.

Training follows Section 5 of the paper: Adam(beta1=0.9, beta2=0.98, eps=1e-9); the learning rate
``lr = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)`` per optimizer step (Eq. 3); label
smoothing eps_ls (Section 5.4). Perplexity is per target subword from the UNSMOOTHED loss, as in Table 3.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_lit import config as C
from transformer_lit.errors import NonFiniteLossError
from transformer_lit.model import build_model

log = logging.getLogger(__name__)


def inverse_sqrt_lr(step: int, *, d_model: int, warmup_steps: int, factor: float = 1.0) -> float:
    """Eq. 3 of the paper for optimizer step ``step`` (1-based): linear warm-up, then step^-0.5 decay."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def label_smoothed_nll(
    logits: Tensor, target: Tensor, *, epsilon: float, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed cross-entropy (the training loss) and the plain NLL (for perplexity).

    The smoothed target puts 1 - epsilon on the gold token and spreads epsilon uniformly over the whole
    vocabulary (Szegedy et al. 2016, as cited in Section 5.4). PAD positions of ``target`` are ignored.

    Args:
        logits: (b, t, V) decoder outputs.
        target: (b, t) gold ids, PAD where there is no token.
    Returns:
        (smoothed loss summed over tokens, NLL summed over tokens, number of non-PAD tokens).
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (b*t, V)
    target = target.flatten()  # (b*t,)
    keep = target != pad_id
    lprobs, target = lprobs[keep], target[keep]  # (n, V), (n,)
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (n,)
    smooth = -lprobs.mean(dim=-1)  # (n,): cross-entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss.sum(), nll.sum(), keep.sum()


class TransformerLitModule(L.LightningModule):
    """Trains a ``Transformer`` with the paper's recipe and evaluates dev perplexity (and BLEU).

    Args:
        cfg: the resolved run config (only ``cfg.model`` reaches the model, through ``build_model``).
        vocab_size: size of the shared subword vocabulary.
        pad_id: the PAD id, ignored by the loss.
        bleu_fn: optional callable ``(module) -> dict`` that decodes the dev set and returns BLEU metrics;
            called on rank 0 at ``cfg.eval.bleu_every_n_steps`` (the harness supplies it).
    """

    def __init__(self, cfg: C.RunConfig, vocab_size: int, pad_id: int = 0, bleu_fn: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.model = build_model(cfg.model, vocab_size, pad_id)
        self.bleu_fn = bleu_fn
        # Plain values only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"config": C.to_dict(cfg), "vocab_size": vocab_size, "pad_id": pad_id})
        self.train_tokens = 0  # target tokens seen on this rank; restored from checkpoints
        self.wall_seconds_before = (
            0.0  # training time of earlier (killed) attempts; restored from checkpoints
        )
        self._fit_start = time.perf_counter()
        self._val_nll = 0.0
        self._val_tokens = 0
        self.last_val: dict[str, float] = {}

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.model(src, tgt_in)

    # ------------------------------------------------------------------------------------------------------
    # Training

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Dropout masks become a function of (seed, batch): a run killed and resumed draws exactly the masks
        # an uninterrupted run would, so both end with the same weights on CPU.
        key = (self.cfg.train.seed, self.current_epoch, batch_idx, self.global_step, self.global_rank)
        torch.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["src"], batch["tgt_in"])  # (b, t, V)
        loss_sum, nll_sum, ntok = label_smoothed_nll(
            logits, batch["tgt_out"], epsilon=self.cfg.optim.label_smoothing, pad_id=self.pad_id
        )
        ntok_f = ntok.clamp(min=1).float()
        loss = loss_sum / ntok_f
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; the run stops here "
                "and its last good checkpoint is kept (lower optim.lr_factor or raise optim.warmup_steps)"
            )
        self.train_tokens += int(ntok)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(ntok))
        self.log("train/nll", nll_sum / ntok_f, batch_size=int(ntok))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> dict[str, Any]:
        o, d_model = self.cfg.optim, self.cfg.model.d_model
        # fused: one kernel over all parameters instead of ~10 per tensor (tiny base on one CPU thread: 1.0 ms
        # per step instead of 5.3, ~5% of a training step); the same update up to float rounding.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.model.parameters())
        optimizer = torch.optim.Adam(
            self.model.parameters(), lr=1.0, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None
        )
        # LambdaLR multiplies lr=1.0 by the schedule; its counter starts at 0 for the first optimizer step.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda i: inverse_sqrt_lr(
                i + 1, d_model=d_model, warmup_steps=o.warmup_steps, factor=o.lr_factor
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if self.cfg.optim.grad_clip is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm"
            )

    # ------------------------------------------------------------------------------------------------------
    # Validation: per-token perplexity from the unsmoothed loss, summed over the whole dev set

    def on_validation_epoch_start(self) -> None:
        self._val_nll, self._val_tokens = 0.0, 0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(batch["src"], batch["tgt_in"])  # (b, t, V)
        _, nll_sum, ntok = label_smoothed_nll(logits, batch["tgt_out"], epsilon=0.0, pad_id=self.pad_id)
        self._val_nll += float(nll_sum)
        self._val_tokens += int(ntok)

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor(
            [self._val_nll, float(self._val_tokens)], dtype=torch.float64, device=self.device
        )
        totals = self.all_gather(totals).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else totals
        nll, ntok = float(totals[0]), max(float(totals[1]), 1.0)
        loss = nll / ntok
        self.last_val = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": ntok}
        self.log("val/loss", loss, prog_bar=False, sync_dist=False)
        self.log("val/ppl", self.last_val["val/ppl"], prog_bar=True, sync_dist=False)
        every = self.cfg.eval.bleu_every_n_steps
        if self.bleu_fn is not None and every and self.global_step > 0 and self.global_step % every == 0:
            self._log_bleu()

    def _log_bleu(self) -> None:
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            metrics = {k: v for k, v in self.bleu_fn(self).items() if isinstance(v, int | float)}
        for key, value in metrics.items():
            self.log(f"val/{key}", float(value), rank_zero_only=True)

    # ------------------------------------------------------------------------------------------------------
    # Checkpoint state beyond weights and optimizer

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_tokens"] = self.train_tokens
        checkpoint["wall_seconds"] = self.wall_seconds_before + time.perf_counter() - self._fit_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_tokens = int(checkpoint.get("train_tokens", 0))
        self.wall_seconds_before = float(checkpoint.get("wall_seconds", 0.0))
