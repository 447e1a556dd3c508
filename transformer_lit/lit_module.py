"""Lightning glue: the paper's loss, optimiser and schedule around ``Transformer``; dev PPL and BLEU.

Training follows Section 5 of the paper: Adam(beta1=0.9, beta2=0.98, eps=1e-9); the learning rate
``lr = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)`` per optimizer step (Eq. 3); label
smoothing eps_ls (Section 5.4). Perplexity is per target subword from the UNSMOOTHED loss, as in Table 3.

One optimizer update's loss is the sum of its token losses over all micro-batches and ranks divided by its
target tokens (tensor2tensor, fairseq; ``loss.UpdateLoss``). The reported ``train/loss`` (smoothed) and
``train/nll``, ``train/ppl`` (unsmoothed) are per token of the update, like ``val/loss`` and ``val/ppl``.

No step reads a value back to the host (on a GPU such a read makes the CPU wait for the queued kernels):
sums and token counts stay on the device, the non-finite-loss guard is read only where the host reads
anyway (``loss.NonFiniteGuard``), and training metrics are logged only at logging steps and never to the
progress bar, whose values Lightning converts to Python numbers after every batch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from transformer_lit import config as C
from transformer_lit.loss import NonFiniteGuard, UpdateLoss, chunked_label_smoothed_nll, label_smoothed_nll
from transformer_lit.model import build_model

log = logging.getLogger(__name__)


def inverse_sqrt_lr(step: int, *, d_model: int, warmup_steps: int, factor: float = 1.0) -> float:
    """Eq. 3 of the paper for optimizer step ``step`` (1-based): linear warm-up, then step^-0.5 decay."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


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
        # Target tokens trained on, all ranks together; restored from checkpoints. A buffer follows the
        # module to its device; not persistent, so the state_dict holds the model only.
        self.register_buffer("_train_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self.wall_seconds_before = (
            0.0  # training time of earlier (killed) attempts; restored from checkpoints
        )
        self._fit_start = time.perf_counter()
        self._update = UpdateLoss()
        self._guard = NonFiniteGuard()
        self._features = self.model.features  # the training forward; compiled by compile_model()
        self._report_compile = False  # log the first step's time (compilation included)
        self._step_start = 0.0
        self._val_sums: Tensor | None = None  # (2,) float64: dev NLL and tokens, on the device
        self._started_training = False
        self.last_val: dict[str, float] = {}
        if cfg.train.compile:
            self.compile_model()

    @property
    def train_tokens(self) -> int:
        """Target tokens trained on so far, all ranks together (one host read)."""
        return int(self._train_tokens)

    def compile_model(self) -> None:
        """Train through ``torch.compile`` of ``Transformer.features`` (``train.compile``).

        Only the training forward is compiled (``dynamic=True``: batch shapes change at every step, and
        would otherwise recompile): validation and beam search run eagerly and trigger no compilation of
        their own. Weights and their state_dict keys are the model's own, so checkpoints do not depend on
        the flag. Compilation happens in the first step; its time is logged then.
        """
        self._features = torch.compile(self.model.features, dynamic=True)
        self._report_compile = True

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.model(src, tgt_in)

    # ------------------------------------------------------------------------------------------------------
    # Training

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Dropout masks become a function of (seed, batch): a run killed and resumed draws exactly the masks
        # an uninterrupted run would, so both end with the same weights on CPU.
        key = (self.cfg.train.seed, self.current_epoch, batch_idx, self.global_step, self.global_rank)
        torch.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)
        if self._report_compile:
            self._step_start = time.perf_counter()
        if not self._started_training:  # marks the end of a run's set-up (bench/data_scale.py times it)
            self._started_training = True
            log.info("first training step on rank %d", self.global_rank)

    def _loss(self, batch: dict[str, Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
        """(smoothed loss sum, NLL sum, target tokens); chunked unless train.loss_chunk_tokens=null."""
        features = self._features if self.training else self.model.features  # validation runs eagerly
        hidden = features(batch["src"], batch["tgt_in"])  # (b, t, d_model)
        chunk = self.cfg.train.loss_chunk_tokens
        if chunk is None:
            logits = self.model.output_proj(hidden)  # (b, t, V)
            return label_smoothed_nll(logits, batch["tgt_out"], epsilon=epsilon, pad_id=self.pad_id)
        weight = self.model.output_proj.weight  # (V, d_model)
        return chunked_label_smoothed_nll(
            hidden, weight, batch["tgt_out"], epsilon=epsilon, pad_id=self.pad_id, chunk_tokens=chunk
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The SUMMED smoothed loss; ``on_before_optimizer_step`` divides by the update's tokens."""
        loss_sum, nll_sum, ntok = self._loss(batch, self.cfg.optim.label_smoothing)
        self._update.add(loss_sum, nll_sum, ntok)
        return loss_sum

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._report_compile:
            seconds = time.perf_counter() - self._step_start
            log.info("torch.compile: the first training step took %.1f s, compilation included", seconds)
            self._report_compile = False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """All micro-batches of the update are back-propagated: scale the gradients to the per-token mean.

        Runs before gradient clipping (Lightning clips after this hook), so the clip sees the true gradient.
        """
        trainer = self.trainer
        sums = self._update.finish(
            [p for p in self.parameters() if p.requires_grad],
            divisor=trainer.accumulate_grad_batches * trainer.world_size,
            distributed=trainer.world_size > 1,
        )  # (3,): smoothed loss, NLL, tokens of the update, all ranks
        tokens = sums[2].clamp(min=1.0)
        loss = sums[0] / tokens
        self._guard.observe(loss, self.global_step)
        self._train_tokens += sums[2].long()
        if (self.global_step + 1) % trainer.log_every_n_steps == 0:  # the steps Lightning's loggers write
            self._guard.check()
            nll = sums[1] / tokens
            self.log("train/loss", loss)
            self.log("train/nll", nll)
            self.log("train/ppl", nll.exp())
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
        self._guard.check()  # no compute on a model whose loss went bad
        self._val_sums = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, nll_sum, ntok = self._loss(batch, 0.0)
        sums = torch.stack([nll_sum.double(), ntok.double()])  # (2,)
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        totals = self._val_sums if self._val_sums is not None else torch.zeros(2, dtype=torch.float64)
        totals = totals.to(self.device)
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
        self._started_training = False

    def on_train_end(self) -> None:
        self._guard.check()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._guard.check()  # raises before anything is written: the last good checkpoint stays the last
        checkpoint["train_tokens"] = self.train_tokens
        checkpoint["wall_seconds"] = self.wall_seconds_before + time.perf_counter() - self._fit_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._train_tokens.fill_(int(checkpoint.get("train_tokens", 0)))
        self.wall_seconds_before = float(checkpoint.get("wall_seconds", 0.0))
