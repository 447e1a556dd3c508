"""The training loss: chunked = plain, per-token normalisation of an update across micro-batches and ranks,
no host reads in a training step, the non-finite guard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.ddp_loss_worker import PAD, PER_RANK, VOCAB, GradProbe, config, micro_batches, one_batch, trainer
from transformer_lit.errors import NonFiniteLossError
from transformer_lit.loss import NonFiniteGuard, UpdateLoss, chunked_label_smoothed_nll, label_smoothed_nll
from transformer_lit.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-6, atol=1e-6)


def hidden_weight_target(seed: int = 0, b: int = 3, t: int = 7, d: int = 16, vocab: int = 50):
    """Decoder outputs, output projection and targets at the model's scales (unit-variance hidden states,
    weights ~ N(0, d^-0.5) like the shared embedding), with PAD at the ends of rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * d**-0.5).requires_grad_()
    target = torch.randint(1, vocab, (b, t), generator=gen)
    target[0, 5:] = PAD
    target[2, 2:] = PAD
    return hidden, weight, target


@pytest.mark.parametrize("epsilon", [0.1, 0.0])
@pytest.mark.parametrize("chunk", [1, 4, 21, 1000])  # one position, uneven chunks, exact fit, one chunk
def test_chunked_loss_equals_plain_loss_in_values_and_gradients(epsilon: float, chunk: int) -> None:
    hidden, weight, target = hidden_weight_target()
    plain = label_smoothed_nll(hidden @ weight.T, target, epsilon=epsilon, pad_id=PAD)
    chunked = chunked_label_smoothed_nll(
        hidden, weight, target, epsilon=epsilon, pad_id=PAD, chunk_tokens=chunk
    )
    assert int(chunked[2]) == int(plain[2]) == 14
    ntok = plain[2]
    for got, want in zip(chunked[:2], plain[:2], strict=True):  # per-token loss and NLL
        torch.testing.assert_close(got / ntok, want / ntok, **TOL)
    # a non-trivial incoming gradient, as Lightning's division by the accumulation count gives
    want = torch.autograd.grad(plain[0] * 0.37, (hidden, weight))
    got = torch.autograd.grad(chunked[0] * 0.37, (hidden, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert not chunked[1].requires_grad  # the NLL is for perplexity only


def test_chunked_loss_without_gradients_and_under_bf16_autocast() -> None:
    hidden, weight, target = hidden_weight_target(seed=1)
    plain = label_smoothed_nll(hidden @ weight.T, target, epsilon=0.1, pad_id=PAD)
    with torch.no_grad():  # validation: no gradient is computed or kept
        chunked = chunked_label_smoothed_nll(hidden, weight, target, epsilon=0.1, pad_id=PAD, chunk_tokens=5)
    assert chunked[0].grad_fn is None
    torch.testing.assert_close(chunked[0] / plain[2], plain[0] / plain[2], **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = label_smoothed_nll(hidden @ weight.T, target, epsilon=0.1, pad_id=PAD)
        chunked = chunked_label_smoothed_nll(hidden, weight, target, epsilon=0.1, pad_id=PAD, chunk_tokens=5)
    assert chunked[0].dtype == torch.float32  # softmax and sums in fp32, projections in bf16
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-3, atol=1e-3)
    want = torch.autograd.grad(plain[0], (hidden, weight))
    got = torch.autograd.grad(chunked[0], (hidden, weight))
    assert [g.dtype for g in got] == [torch.float32, torch.float32]  # the fp32 master weights' dtype
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_chunk_size_must_be_positive() -> None:
    hidden, weight, target = hidden_weight_target()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer, got 0"):
        chunked_label_smoothed_nll(hidden, weight, target, epsilon=0.1, pad_id=PAD, chunk_tokens=0)


# --------------------------------------------------------------------------------------------------------
# One update = sum of token losses / tokens, over micro-batches and ranks


def _reference_grads(module, batches, *, per_micro_batch_mean: bool = False) -> list[torch.Tensor]:
    """Gradients of the per-token mean smoothed loss of ``batches`` taken as ONE batch, plain torch (or of
    the mean of the micro-batches' means, the normalisation this project used before)."""
    model = build_model(module.cfg.model, VOCAB, PAD)
    model.load_state_dict(module.model.state_dict())
    eps = module.cfg.optim.label_smoothing
    if per_micro_batch_mean:
        losses = []
        for b in batches:
            loss_sum, _, ntok = label_smoothed_nll(
                model(b["src"], b["tgt_in"]), b["tgt_out"], epsilon=eps, pad_id=PAD
            )
            losses.append(loss_sum / ntok)
        loss = torch.stack(losses).mean()
    else:
        b = one_batch(batches)
        loss_sum, _, ntok = label_smoothed_nll(
            model(b["src"], b["tgt_in"]), b["tgt_out"], epsilon=eps, pad_id=PAD
        )
        loss = loss_sum / ntok
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("chunk", [4096, 7, None])  # one chunk, several, the plain loss
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(chunk: int | None) -> None:
    """A real Trainer accumulates 4 micro-batches of 1 to ~40 target tokens into one update: its gradient is
    the one batch holding all of them gives, and it reports the update's per-token losses."""
    batches = micro_batches()
    torch.manual_seed(0)
    module = GradProbe(config(**{"train.loss_chunk_tokens": chunk}), vocab_size=VOCAB, pad_id=PAD)
    want = _reference_grads(module, batches)
    fit = trainer(devices=1, accumulate_grad_batches=len(batches), log_every_n_steps=1)
    fit.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(module.recorder.grads) == 1  # one optimizer update
    _assert_grads_close(module.recorder.grads[0], want)
    # ...which is not what averaging the micro-batches' means gives (the test can tell them apart)
    old = _reference_grads(module, batches, per_micro_batch_mean=True)
    assert max(float((g - o).abs().max()) for g, o in zip(want, old, strict=True)) > 1e-3

    # reported per token of the whole update: smoothed loss, and the unsmoothed NLL and its perplexity
    b = one_batch(batches)
    with torch.no_grad():
        eps = module.cfg.optim.label_smoothing
        loss_sum, nll_sum, ntok = label_smoothed_nll(
            module.model(b["src"], b["tgt_in"]), b["tgt_out"], epsilon=eps, pad_id=PAD
        )
    logged = fit.logged_metrics
    torch.testing.assert_close(logged["train/loss"].double(), (loss_sum / ntok).double(), **TOL)
    torch.testing.assert_close(logged["train/nll"].double(), (nll_sum / ntok).double(), **TOL)
    torch.testing.assert_close(logged["train/ppl"], logged["train/nll"].exp())
    assert module.train_tokens == int(ntok)


def test_two_gloo_ddp_ranks_give_the_gradient_of_one_batch(tmp_path: Path) -> None:
    """2 real processes (Lightning's ddp strategy, gloo), 2 accumulated micro-batches each: every rank's
    gradient is the one of the single batch holding all 4 micro-batches."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_loss_worker.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    batches = micro_batches()
    assert len(batches) == 2 * PER_RANK
    torch.manual_seed(0)  # the worker's initial weights
    module = GradProbe(config(), vocab_size=VOCAB, pad_id=PAD)
    want = _reference_grads(module, batches)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads_rank{rank}.pt", weights_only=True)
        _assert_grads_close(got, want)


def test_update_loss_scales_by_the_divisor_over_all_tokens() -> None:
    """With sums of 2 micro-batches (3 and 5 tokens) and a loop that divided by 2, the gradient becomes the
    per-token mean: x 2 / 8."""
    update = UpdateLoss()
    update.add(torch.tensor(6.0), torch.tensor(5.0), torch.tensor(3))
    update.add(torch.tensor(10.0), torch.tensor(9.0), torch.tensor(5))
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([4.0, -8.0])
    sums = update.finish([p], divisor=2, distributed=False)
    assert sums.tolist() == [16.0, 14.0, 8.0]
    assert p.grad.tolist() == [1.0, -2.0]
    with pytest.raises(RuntimeError, match="finish before any add"):
        update.finish([p], divisor=2, distributed=False)


# --------------------------------------------------------------------------------------------------------
# No host reads in a training step; the non-finite guard


@pytest.mark.parametrize("chunk", [4, None])
def test_a_training_step_reads_nothing_back_to_the_host(chunk: int | None) -> None:
    """The module's training step, backward and update scaling run on the meta device, where every host
    read raises (``.item()``, ``bool(t)``, ``int(t)``, boolean-mask indexing, ``nonzero``): so on a GPU
    none of them makes the CPU wait. (Run under CUDA's sync debug mode by the gpu-marked test.)"""
    module = GradProbe(config(**{"train.loss_chunk_tokens": chunk}), vocab_size=VOCAB, pad_id=PAD)
    module.trainer = trainer(devices=1, accumulate_grad_batches=2, log_every_n_steps=50)
    module.to("meta")
    opt = module.configure_optimizers()
    for i, batch in enumerate(micro_batches()[:2]):
        loss = module.training_step({k: v.to("meta") for k, v in batch.items()}, i)
        assert loss.device.type == "meta"
        (loss / 2).backward()
    module.on_before_optimizer_step(opt)
    assert all(p.grad.device.type == "meta" for p in module.parameters())
    with pytest.raises(RuntimeError, match="meta"):  # the guard's own read is the only one, and on demand
        module._guard.check()


def test_non_finite_guard_reports_the_first_bad_step() -> None:
    guard = NonFiniteGuard()
    guard.check()  # nothing observed yet
    guard.observe(torch.tensor(2.5), 0)
    guard.check()
    guard.observe(torch.tensor(float("inf")), 7)
    guard.observe(torch.tensor(float("nan")), 8)
    guard.observe(torch.tensor(1.0), 9)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss \(inf\) at step 7; the run stops"
    ):
        guard.check()
