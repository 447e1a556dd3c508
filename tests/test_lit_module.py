"""The paper's training recipe: schedule (Eq. 3), label smoothing (Section 5.4), optimiser settings."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_lit import config as C
from transformer_lit.lit_module import TransformerLitModule, inverse_sqrt_lr
from transformer_lit.loss import label_smoothed_nll


def test_schedule_peaks_at_warmup():
    lrs = [inverse_sqrt_lr(s, d_model=512, warmup_steps=4000) for s in range(1, 20001)]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == 4000
    assert lrs[3999] == pytest.approx(512**-0.5 * 4000**-0.5)
    # linear warm-up, then inverse square root decay
    assert lrs[1999] == pytest.approx(lrs[3999] / 2)
    assert lrs[15999] == pytest.approx(lrs[3999] / 2)


def test_label_smoothing_equals_hand_computation():
    torch.manual_seed(0)
    vocab, eps, pad = 7, 0.1, 0
    logits = torch.randn(2, 3, vocab)
    target = torch.tensor([[4, 2, 0], [5, 6, 1]])  # one PAD position
    loss, nll, ntok = label_smoothed_nll(logits, target, epsilon=eps, pad_id=pad)
    want_loss, want_nll = 0.0, 0.0
    for b in range(2):
        for t in range(3):
            y = int(target[b, t])
            if y == pad:
                continue
            logp = torch.log_softmax(logits[b, t], -1)
            q = torch.full((vocab,), eps / vocab)  # smoothed target: eps spread over the vocabulary...
            q[y] += 1 - eps  # ...and 1 - eps on the gold token
            want_loss += float(-(q * logp).sum())
            want_nll += float(-logp[y])
    assert int(ntok) == 5
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    assert float(nll) == pytest.approx(want_nll, rel=1e-6)
    # eps = 0 gives the plain NLL
    loss0, nll0, _ = label_smoothed_nll(logits, target, epsilon=0.0, pad_id=pad)
    assert float(loss0) == pytest.approx(float(nll0))


def test_optimizer_and_schedule_follow_the_paper():
    cfg = C.apply_overrides(
        C.base(),
        {
            "model.d_model": 32,
            "model.d_ff": 64,
            "model.d_k": 4,
            "model.d_v": 4,
            "model.num_layers": 1,
            "optim.warmup_steps": 10,
        },
    )
    module = TransformerLitModule(cfg, vocab_size=50)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9
    assert group["fused"]  # one kernel for all parameters on CPU and CUDA
    assert conf["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(32**-0.5 * 10**-1.5)  # step 1
    assert max(seen) == pytest.approx(32**-0.5 * 10**-0.5) and seen.index(max(seen)) == 9  # step 10 = warmup
    assert math.isclose(seen[19], 32**-0.5 * 20**-0.5, rel_tol=1e-9)


def test_hyperparameters_are_plain_values():
    module = TransformerLitModule(C.apply_overrides(C.base(), {"model.num_layers": 1}), vocab_size=30)
    hp = dict(module.hparams)
    assert hp["vocab_size"] == 30 and hp["config"]["model"]["d_k"] == 64
    torch.save(hp, "/dev/null")  # plain values only: checkpoints load with weights_only=True
