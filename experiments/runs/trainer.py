"""The Lightning side of a run: build the Trainer, fit (resuming if a checkpoint exists), evaluate dev.

Split from ``run.py`` so that skipping a complete run, planning and tables never import torch.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch

from experiments.runs import folder as RF
from experiments.runs.folder import RunInfo
from experiments.runs.lightning_io import (
    ResumableCSVLogger,
    StepCheckpoint,
    VerifiedCheckpointIO,
    resume_checkpoint,
)
from experiments.runs.progress import StepProgressBar
from experiments.runs.watchdog import StallWatchdog
from transformer_lit import config as C
from transformer_lit.data import TranslationDataModule
from transformer_lit.errors import no_gpu_message
from transformer_lit.lit_module import TransformerLitModule
from transformer_lit.params import count_parameters

log = logging.getLogger(__name__)


def _precision(cfg: C.RunConfig) -> str:
    return "bf16-mixed" if cfg.train.precision == "bf16" else "32-true"


def _world_size(cfg: C.RunConfig) -> int:
    return cfg.train.devices * int(os.environ.get("SLURM_NNODES", os.environ.get("NUM_NODES", "1")))


def check_accelerator(cfg: C.RunConfig) -> None:
    """``train.accelerator=gpu`` without a GPU: one line before anything is written (Lightning's own error is
    a 33-line traceback)."""
    accelerator = cfg.train.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            no_gpu_message(f"train.accelerator={accelerator!r}", "train.accelerator=cpu or auto")
        )


def build_trainer(
    cfg: C.RunConfig, run_dir: Path, info: RunInfo, callbacks: list[Any], resume_step: int = 0
) -> L.Trainer:
    """The run's Trainer; ``resume_step``: the step of the checkpoint it resumes from (metrics.csv keeps the
    rows before it). Checkpoints are written whole or not at all (``VerifiedCheckpointIO``)."""
    t = cfg.train
    accumulate = C.accumulation(cfg, _world_size(cfg))
    checkpoint = StepCheckpoint(
        val_every_n_steps=t.val_every_n_steps,
        dirpath=run_dir / RF.CKPT_DIR,
        filename=RF.PERIODIC_CKPT,
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        monitor="step",
        mode="max",
        save_top_k=t.keep_checkpoints,
        save_last=True,
        save_on_train_epoch_end=False,
        enable_version_counter=False,  # a name is a step: a resumed run rewrites it, never adds "-v1"
    )
    loggers: list[Any] = [ResumableCSVLogger(run_dir, resume_step)]
    if t.wandb:
        loggers.append(_wandb_logger(cfg, run_dir, info))
    extra = [StepProgressBar(leave=True)] if t.progress_bar else []
    extra.append(StallWatchdog(t.stall_timeout))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy="ddp" if t.devices > 1 else "auto",
        precision=_precision(cfg),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        # val_check_interval counts batches, not optimizer steps
        val_check_interval=t.val_every_n_steps * accumulate,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        logger=loggers,
        callbacks=[checkpoint, *extra, *callbacks],
        plugins=[VerifiedCheckpointIO()],
        default_root_dir=run_dir,
        deterministic=False,
    )


def _wandb_logger(cfg: C.RunConfig, run_dir: Path, info: RunInfo) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    _configure_wandb_mode()
    flat = C.flat_dict(cfg) | {"grid": info.grid, "scale": info.scale, "row": info.row}
    run_id_file = run_dir / RF.WANDB_ID  # the same W&B run continues after a resume
    if not run_id_file.is_file():
        RF.write_atomic(run_id_file, uuid.uuid4().hex[:12])
    run_id = run_id_file.read_text().strip()
    logger = WandbLogger(
        project=cfg.train.wandb_project,
        group=info.group,
        job_type=info.row,
        name=f"{info.grid}/{info.scale}/{info.row}/seed{cfg.train.seed}",
        save_dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=flat,
    )
    return logger


def _configure_wandb_mode() -> None:
    """Offline unless the user is logged in; an explicit WANDB_MODE always wins (docs/DESIGN.md, field
    notes)."""
    if os.environ.get("WANDB_MODE"):
        return
    logged_in = bool(os.environ.get("WANDB_API_KEY"))
    if not logged_in:
        import netrc

        try:
            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
    os.environ["WANDB_MODE"] = "online" if logged_in else "offline"


def _device_name(trainer: L.Trainer) -> str:
    if trainer.strategy.root_device.type == "cuda":
        return f"{trainer.num_devices}x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    return f"cpu ({torch.get_num_threads()} threads) x{trainer.num_devices}"


def _seed_and_threads(cfg: C.RunConfig) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)


def fit_and_evaluate(cfg: C.RunConfig, run_dir: Path, info: RunInfo, callbacks: list[Any]) -> dict | None:
    """Fit with resume, then dev PPL (all ranks) and dev BLEU (rank 0). Returns the summary on rank 0."""
    _seed_and_threads(cfg)
    resume, resume_step = resume_checkpoint(run_dir)  # before any work: a broken folder fails at once
    ckpt_dir = run_dir / RF.CKPT_DIR
    tokenizer_path = ckpt_dir / RF.TOKENIZER
    dm = TranslationDataModule(
        cfg.data,
        seed=cfg.train.seed,
        tokenizer_path=str(tokenizer_path) if tokenizer_path.is_file() else None,
    )
    dm.prepare_data()
    dm.setup("fit")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not tokenizer_path.is_file():
        dm.save_tokenizer(tokenizer_path)

    bleu_fn = _make_bleu_fn(cfg, dm, limit=cfg.eval.max_sentences)
    module = TransformerLitModule(cfg, dm.tokenizer.vocab_size, pad_id=dm.tokenizer.pad_id, bleu_fn=bleu_fn)
    if resume:
        log.info("resuming %s from %s (step %d)", run_dir, resume, resume_step)
    trainer = build_trainer(cfg, run_dir, info, callbacks, resume_step)

    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    fit_seconds = time.perf_counter() - start
    # The dev PPL after training is logged at the run's last step. Lightning logs it at its batch counter,
    # which after a resumed fit ends one lower than after an uninterrupted one: metrics.csv would differ.
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
    trainer.validate(module, datamodule=dm, verbose=False)
    ppl = module.last_val.get("val/ppl", float("nan"))

    train_tokens = module.train_tokens  # all ranks together
    if not trainer.is_global_zero:
        return None

    bleu = _make_bleu_fn(cfg, dm, limit=None, hyps_path=run_dir / RF.HYPS_DEV)(module)
    wall = module.wall_seconds_before + fit_seconds  # fit_seconds: this attempt only
    summary = {
        "grid": info.grid,
        "scale": info.scale,
        "row": info.row,
        "seed": cfg.train.seed,
        "params": count_parameters(cfg.model, dm.tokenizer.vocab_size),
        "vocab_size": dm.tokenizer.vocab_size,
        "ppl_dev": ppl,
        "bleu_dev": bleu["bleu"],
        "bleu_dev_tok": bleu["bleu_tok"],
        "sacrebleu_signature": bleu["signature"],
        "train_steps": trainer.global_step,
        "train_tokens": train_tokens,
        "wall_seconds": round(wall, 2),
        "tokens_per_second": round(train_tokens / max(wall, 1e-9), 1),
        "device": _device_name(trainer),
        "status": "complete",
    }
    _finish_wandb(trainer, summary)
    return summary


def _write_lines(path: Path, lines: list[str]) -> None:
    RF.write_atomic(path, "".join(line.replace("\n", " ") + "\n" for line in lines))


def _make_bleu_fn(
    cfg: C.RunConfig, dm: TranslationDataModule, limit: int | None, hyps_path: Path | None = None
):
    """A callable that decodes (the first ``limit``) dev sentences by beam search and scores them."""
    from transformer_lit.decoding import translate
    from transformer_lit.metrics import sacre_bleu, tokenized_bleu

    def bleu_fn(module: TransformerLitModule) -> dict[str, Any]:
        pairs = dm.dev_pairs[:limit] if limit else dm.dev_pairs
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
        was_training = module.model.training
        module.model.eval()
        with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            hyps = translate(
                module.model,
                dm.tokenizer,
                sources,
                beam_size=cfg.eval.beam_size,
                alpha=cfg.eval.alpha,
                max_len_b=cfg.eval.max_len_b,
                batch_size=cfg.eval.batch_size,
            )
        module.model.train(was_training)
        if hyps_path is not None:  # kept for significance tests (paired bootstrap) by the tables
            _write_lines(hyps_path, hyps)
            _write_lines(hyps_path.with_name(RF.REFS_DEV), refs)
        score, signature = sacre_bleu(hyps, refs)
        return {"bleu": score, "bleu_tok": tokenized_bleu(hyps, refs), "signature": signature}

    return bleu_fn


def _finish_wandb(trainer: L.Trainer, summary: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
            logger.experiment.finish()
