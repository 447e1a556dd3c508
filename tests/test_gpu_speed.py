"""The fast path on a CUDA device: no host synchronisation per training step, SDPA off the math kernel.

Every test here needs CUDA and skips without it; none has run on a GPU yet (the project's machine has
none). The CPU stand-ins are ``test_loss.py::test_a_training_step_reads_nothing_back_to_the_host`` (the
same step on the meta device) and ``test_attention.py::test_our_masks_run_on_the_cpu_flash_kernel``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from tests.ddp_loss_worker import PAD, VOCAB, config, micro_batches, trainer
from transformer_lit.decoding import beam_search
from transformer_lit.lit_module import TransformerLitModule
from transformer_lit.model import Transformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]
FAST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("chunk", [16, None])
def test_training_steps_never_synchronise_with_the_host(chunk: int | None) -> None:
    """Two updates of two micro-batches each, bf16 autocast, fused Adam, the module's own hooks: under
    ``set_sync_debug_mode("error")`` any host read (``.item()``, ``bool(t)``, a boolean mask, a pageable copy)
    raises."""
    torch.manual_seed(0)
    module = TransformerLitModule(config(**{"train.loss_chunk_tokens": chunk}), vocab_size=VOCAB, pad_id=PAD)
    module.trainer = trainer(devices=1, accumulate_grad_batches=2, log_every_n_steps=50)
    module.to("cuda")
    opt = module.configure_optimizers()["optimizer"]
    batches = [
        {k: v.pin_memory().to("cuda", non_blocking=True) for k, v in b.items()} for b in micro_batches()
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, batch in enumerate(batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.training_step(batch, i)
            (loss / 2).backward()
            if i % 2 == 1:
                module.on_before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    module._guard.check()  # finite, and readable once outside the steps
    assert module.train_tokens == sum(int(b["tgt_out"].ne(PAD).sum()) for b in batches)


class _SyncCheck(L.Callback):
    """Turns CUDA's sync debug mode to "error" for the steps after the first two (set-up, lazy init)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx >= 2:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")


def test_lightning_training_loop_does_not_synchronise_between_logging_steps() -> None:
    """The same through a real Trainer in bf16-mixed with pinned, non-blocking batch copies: Lightning's
    own loop must not read back either, between logging steps and with the progress bar off."""
    torch.manual_seed(0)
    module = TransformerLitModule(config(**{"train.loss_chunk_tokens": 16}), vocab_size=VOCAB, pad_id=PAD)
    loader = DataLoader(micro_batches() * 3, batch_size=None, pin_memory=True)
    fit = L.Trainer(
        accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=6, accumulate_grad_batches=2,
        log_every_n_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[_SyncCheck()],
    )  # fmt: skip
    fit.fit(module, train_dataloaders=loader)
    assert fit.global_step == 6


@pytest.mark.parametrize("d_k, d_v", [(64, 64), (32, 64)])  # row B has d_k < d_v
def test_our_masks_run_on_a_fast_sdpa_kernel(d_k: int, d_v: int) -> None:
    """Training (bool key-padding masks, causal flag) and cached beam search in bf16 with the math kernel
    disabled: SDPA raises "No available kernel" if our masks forced it."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=100, num_layers=2, d_model=256, d_ff=512, num_heads=4, d_k=d_k, d_v=d_v)
    model = model.cuda()
    src = torch.randint(4, 100, (8, 24), device="cuda")
    src[:4, 15:] = PAD  # padded sources: a key-padding mask in the encoder and in cross-attention
    tgt = torch.randint(4, 100, (8, 20), device="cuda")
    with sdpa_kernel(FAST), torch.autocast("cuda", dtype=torch.bfloat16):
        model(src, tgt).float().sum().backward()
        beam_search(model.eval(), src, beam_size=4, max_len_b=5)
