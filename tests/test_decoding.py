"""Greedy and beam search: cache parity, width-1 parity, max length, search quality, translate()."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from transformer_lit.decoding import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty,
    max_lengths,
    pad_batch,
    translate,
)
from transformer_lit.model import Transformer

PAD, BOS, EOS = 0, 2, 3
TINY = dict(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_k=8, d_v=8, dropout=0.0)


def random_model(vocab: int = 40, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=vocab, **{**TINY, **kw}).eval()


def random_src(batch: int = 6, vocab: int = 40, seed: int = 1) -> torch.Tensor:
    """Sources of different lengths (so rows pad differently), each ending in EOS."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (batch,), generator=gen).tolist()
    return pad_batch([torch.randint(4, vocab, (n,), generator=gen).tolist() + [EOS] for n in lengths], PAD)


def reversal_batch(gen: torch.Generator, n: int, vocab: int = 16):
    """Toy task: output the source symbols in reverse order."""
    seqs = [
        torch.randint(4, vocab, (int(length),), generator=gen).tolist()
        for length in torch.randint(2, 9, (n,), generator=gen)
    ]
    src = pad_batch([s + [EOS] for s in seqs], PAD)
    tgt_in = pad_batch([[BOS, *s[::-1]] for s in seqs], PAD)
    tgt_out = pad_batch([[*s[::-1], EOS] for s in seqs], PAD)
    return src, tgt_in, tgt_out


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A micro model trained for 200 steps (~4 s) on reversal: it has learned a lot, not everything, so
    greedy and beam search disagree on some sentences."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Transformer(vocab_size=16, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.9, 0.98))
    for _ in range(200):
        src, tgt_in, tgt_out = reversal_batch(gen, 32)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def tokens(hyps: list[Hypothesis]) -> list[list[int]]:
    return [h.tokens for h in hyps]


def model_score(model: Transformer, src: torch.Tensor, hyp: list[int], alpha: float) -> float:
    """Length-penalised log-probability of ``hyp`` + EOS by teacher forcing (what both searches rank by)."""
    with torch.no_grad():
        logits = model(src[None], torch.tensor([[BOS, *hyp]]))[0]  # (t, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor([[*hyp, EOS]]).T).sum()
    return float(logp) / length_penalty(len(hyp) + 1, alpha)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_cached_decoding_equals_full_recomputation(trained: Transformer, alpha: float) -> None:
    for model, src in (
        (random_model(), random_src()),
        (trained, reversal_batch(torch.Generator().manual_seed(5), 12)[0]),
    ):
        for search, kw in ((greedy_search, {}), (beam_search, {"beam_size": 4})):
            cached = search(model, src, alpha=alpha, max_len_b=6, **kw)
            full = search(model, src, alpha=alpha, max_len_b=6, use_cache=False, **kw)
            assert tokens(cached) == tokens(full)
            for a, b in zip(cached, full, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-4)
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.mark.parametrize("model_kind", ["random", "trained"])
def test_beam_of_width_one_equals_greedy(trained: Transformer, model_kind: str) -> None:
    model, src = (
        (random_model(), random_src())
        if model_kind == "random"
        else (trained, reversal_batch(torch.Generator().manual_seed(2), 32)[0])
    )
    # alpha = 0: the same search, so the same tokens and scores
    greedy, beam1 = greedy_search(model, src, alpha=0.0), beam_search(model, src, beam_size=1, alpha=0.0)
    assert tokens(beam1) == tokens(greedy)
    assert [h.score for h in beam1] == pytest.approx([h.score for h in greedy], abs=1e-5)
    # alpha > 0: width 1 may go on past greedy's EOS (a longer hypothesis can still win), never doing worse
    greedy, beam1 = greedy_search(model, src, alpha=0.6), beam_search(model, src, beam_size=1, alpha=0.6)
    for g, b in zip(greedy, beam1, strict=True):
        assert b.score >= g.score - 1e-5


def test_beam_is_at_least_as_good_as_greedy_on_a_trained_model(trained: Transformer) -> None:
    src = reversal_batch(torch.Generator().manual_seed(1), 64)[0]
    greedy = greedy_search(trained, src, alpha=0.6)
    beam = beam_search(trained, src, beam_size=4, alpha=0.6)
    differ = 0
    for i, (g, b) in enumerate(zip(greedy, beam, strict=True)):
        # both scores recomputed independently by teacher forcing: the searches report what they find
        assert g.score == pytest.approx(model_score(trained, src[i][src[i] != PAD], g.tokens, 0.6), abs=1e-4)
        assert b.score == pytest.approx(model_score(trained, src[i][src[i] != PAD], b.tokens, 0.6), abs=1e-4)
        assert b.score >= g.score - 1e-5, f"sentence {i}: beam {b} worse than greedy {g}"
        differ += g.tokens != b.tokens
    assert differ > 0, "the fixture model should leave greedy and beam search some room to differ"
    # and the model did learn the task: most greedy outputs are exact reversals
    gold = [[x for x in s.tolist() if x not in (PAD, EOS)][::-1] for s in src]
    assert sum(g.tokens == r for g, r in zip(greedy, gold, strict=True)) > len(gold) // 4


def test_early_stop_is_exact(trained: Transformer) -> None:
    src = reversal_batch(torch.Generator().manual_seed(3), 32)[0]
    for alpha in (0.0, 0.6, 1.5):
        stopped = beam_search(trained, src, beam_size=4, alpha=alpha, max_len_b=8)
        full = beam_search(trained, src, beam_size=4, alpha=alpha, max_len_b=8, early_stop=False)
        assert tokens(stopped) == tokens(full)
        assert [h.score for h in stopped] == pytest.approx([h.score for h in full], abs=1e-6)


def test_looking_at_finished_sentences_less_often_changes_no_hypothesis(trained: Transformer) -> None:
    """check_every > 1 keeps finished sentences in the batch, frozen, for a few steps: the same hypotheses,
    scores equal up to float rounding (other rows in the batch can change a matmul's summation order)."""
    src = reversal_batch(torch.Generator().manual_seed(4), 24)[0]
    for alpha, early_stop in ((0.6, True), (0.0, True), (0.6, False)):
        kw = dict(beam_size=4, alpha=alpha, max_len_b=6, early_stop=early_stop)
        every_step = beam_search(trained, src, **kw)
        for check_every in (2, 5, 1000):
            lagged = beam_search(trained, src, check_every=check_every, **kw)
            assert tokens(lagged) == tokens(every_step)
            assert [h.score for h in lagged] == pytest.approx([h.score for h in every_step], abs=1e-5)
            assert [h.logprob for h in lagged] == pytest.approx([h.logprob for h in every_step], abs=1e-5)
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        beam_search(trained, src, check_every=0)


@pytest.mark.parametrize("max_len_b", [0, 1, 4])
def test_hypotheses_never_exceed_max_length(max_len_b: int) -> None:
    # an untrained model rarely says EOS, so hypotheses run into the limit
    model, src = random_model(seed=3), random_src(seed=4)
    limits = max_lengths(model, src, max_len_b).tolist()
    assert limits == [int((row != PAD).sum()) + max_len_b for row in src]
    for search, kw in ((greedy_search, {}), (beam_search, {"beam_size": 3}), (beam_search, {"beam_size": 5})):
        for cache in (True, False):
            hyps = search(model, src, max_len_b=max_len_b, use_cache=cache, **kw)
            assert len(hyps) == src.size(0)
            for hyp, limit in zip(hyps, limits, strict=True):
                assert len(hyp.tokens) <= limit
                assert EOS not in hyp.tokens and BOS not in hyp.tokens
            assert max(len(h.tokens) == lim for h, lim in zip(hyps, limits, strict=True))


def test_beam_wider_than_the_vocabulary() -> None:
    model = random_model(vocab=6)  # PAD UNK BOS EOS + 2 words: fewer than 2k candidates per beam
    src = random_src(vocab=6, seed=8)
    for cache in (True, False):
        hyps = beam_search(model, src, beam_size=5, max_len_b=2, use_cache=cache)
        assert all(set(h.tokens) <= {1, 4, 5} and h.score > float("-inf") for h in hyps)


def test_learned_positions_cap_the_output_length() -> None:
    model = random_model(positional="learned", max_positions=12)
    src = random_src(seed=6)
    for hyp in beam_search(model, src, beam_size=2, max_len_b=50) + greedy_search(model, src, max_len_b=50):
        assert len(hyp.tokens) <= 11  # decoder inputs BOS + 11 tokens fill positions 0..11


def test_bf16_autocast_runs() -> None:
    model, src = random_model(), random_src()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hyps = beam_search(model, src, beam_size=2, max_len_b=3)
    assert all(isinstance(h.score, float) and h.score < 0 for h in hyps)


# ----------------------------------------------------------------------------------------------------------
# translate()


class CharTokenizer:
    """Stand-in for Tokenizer: one id per lowercase letter (ids 4..29), space dropped."""

    pad_id, unk_id, bos_id, eos_id, vocab_size = 0, 1, 2, 3, 30

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) - ord("a") for c in text if "a" <= c <= "z"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i - 4) for i in ids if i >= 4)


def test_translate_keeps_order_and_empty_lines() -> None:
    tok, model = CharTokenizer(), random_model(vocab=30)
    lines = ["abc", "", "hello world", "   ", "xy", "a"]
    out = translate(model, tok, lines, beam_size=2, max_len_b=3, batch_size=2)
    assert len(out) == len(lines)
    assert out[1] == "" and out[3] == ""
    # same outputs as decoding each sentence alone, so sorting and batching do not shuffle anything
    for line, hyp in zip(lines, out, strict=True):
        if line.strip():
            assert hyp == translate(model, tok, [line], beam_size=2, max_len_b=3)[0]
    assert translate(model, tok, []) == []
    assert translate(model, tok, ["", ""]) == ["", ""]


def test_translate_truncates_long_inputs_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tok = CharTokenizer()
    model = random_model(vocab=30, positional="learned", max_positions=10)
    lines = ["abcdefghijklmnopqrstuvwxyz" * 2, "abc"]
    with caplog.at_level(logging.WARNING, logger="transformer_lit.decoding"):
        out = translate(model, tok, lines, beam_size=2, max_len_b=50)
    assert len(out) == 2 and all(len(o) <= 9 for o in out)
    assert "truncated 1 of 2 input lines to 10 tokens" in caplog.text
    # an explicit max_src_len truncates too, and the truncated input decodes like its prefix
    caplog.clear()
    model = random_model(vocab=30)
    with caplog.at_level(logging.WARNING, logger="transformer_lit.decoding"):
        out = translate(model, tok, ["abcdefghij"], max_src_len=4, beam_size=2, max_len_b=2)
    assert "truncated 1 of 1" in caplog.text
    assert out == translate(model, tok, ["abc"], beam_size=2, max_len_b=2)


def test_translate_restores_training_mode() -> None:
    model = random_model(vocab=30).train()
    translate(model, CharTokenizer(), ["abc"], beam_size=1, max_len_b=2)
    assert model.training
