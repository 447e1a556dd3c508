"""Greedy and beam search over ``Transformer.encode`` / ``decode_step`` with cached keys and values.

Shape legend: B sentences in the batch, n sentences still decoding, k beam size, V vocabulary, T the
largest max length in the batch.

The paper (Section 6.1) decodes with beam size 4, length penalty alpha = 0.6 and a maximum output length of
input length + 50, terminating early when possible. Conventions here:

- Decoding starts from BOS; hypotheses are returned without BOS and EOS. PAD and BOS, which are never
  training targets, are never produced (an untrained model would otherwise emit them).
- Max length: ``max_len = (non-PAD source tokens, EOS included) + max_len_b`` output tokens, EOS excluded
  (fairseq's ``max_len_a=0, max_len_b``). At step ``max_len`` only EOS is allowed, so no hypothesis is
  ever longer; a learned position table caps it further at ``max_positions - 1``.
- Score: GNMT's ``logprob / lp(|Y|)`` with ``lp(|Y|) = ((5 + |Y|) / 6) ** alpha`` and ``|Y|`` counting the
  EOS (as tensor2tensor, which the paper used); alpha = 0 ranks by log-probability.
- Beam search keeps k live (non-EOS) beams ranked by log-probability, from the top 2k candidates; an EOS
  candidate ranked among the top k moves to the finished set (fairseq's rule). Only the best finished
  hypothesis per sentence is kept.
- Early stop, exact: a sentence stops when its best finished score is >= ``max_live_logprob / lp(max_len
  + 1)``. Why this bounds every future hypothesis: log-probabilities only decrease as tokens are added
  (each step adds a log-probability <= 0), a hypothesis ends with at most ``max_len + 1`` tokens counting
  EOS, and for a negative log-probability ``L``, ``L / lp(m)`` grows with m when alpha >= 0. So no
  continuation of any live beam can score above the bound, and stopping returns exactly what decoding every
  sentence to its max length would (tensor2tensor's ``stop_early`` uses the same bound). With alpha = 0 the
  bound is the best live log-probability itself.
- Beam search of width 1 returns greedy's hypothesis when alpha = 0. With alpha > 0 it may keep going after
  greedy's EOS (the bound above still allows a longer hypothesis to win) and then finds a hypothesis that
  scores at least as well as greedy's; ``translate`` uses greedy search for ``beam_size=1``.

Finished sentences leave the batch (the cache keeps only live rows), so a batch costs what its unfinished
sentences need. Everything runs under ``torch.inference_mode()`` on the model's device; under
``torch.autocast`` the model computes in bf16 while scores are accumulated in float32.

What a beam-search step leaves to the host, and what it does not (on a GPU, every read of a device value
makes the host wait for the queued kernels): the best finished hypotheses are kept on the device without
branching on device values; the token rules are device tensors made once; the self-attention caches are
allocated once for the longest output, and a beam reorder copies only their filled positions into a
second buffer, leaving the per-sentence encoder keys/values alone. What remains is one read every
``check_every`` steps (which sentences are finished), and the loop over steps itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformer_lit.model import Transformer
    from transformer_lit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BOS_ID, EOS_ID = 2, 3


@dataclass
class Hypothesis:
    """One decoded sentence.

    Attributes:
        tokens: output ids without BOS and EOS.
        score: the ranking score, ``logprob / lp(len(tokens) + 1)``.
        logprob: summed log-probability of the tokens and the final EOS.
    """

    tokens: list[int]
    score: float
    logprob: float


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT length penalty ``((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016), |Y| counting the EOS."""
    return ((5.0 + length) / 6.0) ** alpha


# ----------------------------------------------------------------------------------------------------------
# One decoder step, with the cache or by full recomputation


class _Stepper(Protocol):
    def step(self, tokens: Tensor) -> Tensor: ...
    def reorder(self, index: Tensor) -> None: ...
    def reorder_beams(self, index: Tensor) -> None: ...


class _CachedStepper:
    """Each step feeds one token per row; keys/values of earlier positions come from the cache."""

    def __init__(self, model: Transformer, memory: Tensor, src_pad_mask: Tensor, capacity: int):
        self.model = model
        self.cache = model.init_cache(memory, src_pad_mask, capacity=capacity)

    def step(self, tokens: Tensor) -> Tensor:
        return self.model.decode_step(tokens, self.cache)  # (rows, V)

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)

    def reorder_beams(self, index: Tensor) -> None:
        self.cache.reorder_beams(index)


class _FullStepper:
    """Each step re-runs the decoder over the whole prefix (reference for tests and the benchmark)."""

    def __init__(self, model: Transformer, memory: Tensor, src_pad_mask: Tensor, capacity: int):
        self.model, self.memory, self.src_pad_mask = model, memory, src_pad_mask
        self.prefix = torch.empty(memory.size(0), 0, dtype=torch.long, device=memory.device)  # (rows, 0)

    def step(self, tokens: Tensor) -> Tensor:
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)  # (rows, t+1)
        return self.model.decode(self.prefix, self.memory, self.src_pad_mask)[:, -1]  # (rows, V)

    def reorder(self, index: Tensor) -> None:
        self.reorder_beams(index)
        self.memory = self.memory.index_select(0, index)
        self.src_pad_mask = self.src_pad_mask.index_select(0, index)

    def reorder_beams(self, index: Tensor) -> None:
        self.prefix = self.prefix.index_select(0, index)


def _start(model: Transformer, src: Tensor, use_cache: bool, capacity: int) -> _Stepper:
    """Encode ``src`` and return the stepper; ``capacity``: decoder positions the search may need."""
    memory, src_pad_mask = model.encode(src)  # (B, s, d_model), (B, s)
    return (_CachedStepper if use_cache else _FullStepper)(model, memory, src_pad_mask, capacity)


def position_limit(model: Transformer) -> int | None:
    """Longest sequence the model can embed: the learned position table's size, None for sinusoids."""
    if getattr(model, "positional", "sinusoidal") != "learned":
        return None
    return int(model.tgt_embed.positions.max_positions)


def max_lengths(model: Transformer, src: Tensor, max_len_b: int) -> Tensor:
    """(B,) output length limits: non-PAD source tokens + max_len_b, within the position table."""
    lengths = src.ne(model.pad_id).sum(dim=1) + max_len_b  # (B,)
    limit = position_limit(model)
    if limit is not None:
        lengths = lengths.clamp(max=limit - 1)  # decoder inputs BOS..y_max_len use positions 0..max_len
    return lengths


class _TokenRules:
    """The token rules of every step, as device tensors made once per search: a per-step Python index list
    would be uploaded to the device at every step.

    PAD and BOS, never training targets, are never produced; a row at its max length may only end (EOS).
    """

    def __init__(self, device: torch.device, *, pad_id: int, bos_id: int, eos_id: int):
        self.never = torch.tensor([pad_id, bos_id], device=device)  # (2,)
        self.eos_id = eos_id
        self._not_eos: Tensor | None = None  # (V,) bool, made at the first step (V is known there)

    def logprobs(self, stepper: _Stepper, tokens: Tensor) -> Tensor:
        """Log-probabilities (float32) of the next token, (rows, V)."""
        logp = F.log_softmax(stepper.step(tokens).float(), dim=-1)  # (rows, V)
        return logp.index_fill_(1, self.never, float("-inf"))

    def force_eos(self, logp: Tensor, rows: Tensor) -> Tensor:
        """Only EOS stays possible in ``rows`` (bool, (rows,)): they reached their max length."""
        if self._not_eos is None:
            self._not_eos = torch.arange(logp.size(1), device=logp.device).ne(self.eos_id)  # (V,)
        return logp.masked_fill_(rows[:, None] & self._not_eos, float("-inf"))  # (rows, V)


# ----------------------------------------------------------------------------------------------------------
# Search


@torch.inference_mode()
def greedy_search(
    model: Transformer,
    src: Tensor,
    *,
    max_len_b: int = 50,
    alpha: float = 0.6,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    use_cache: bool = True,
) -> list[Hypothesis]:
    """The most probable next token at every step, for a batch of sources.

    Args:
        model: the Transformer (its dropout should be off: call ``model.eval()``).
        src: (B, s) source ids ending in EOS, right-padded with PAD.
        max_len_b: output tokens allowed beyond the source length.
        alpha: length penalty exponent, used only for the reported ``score``.
        bos_id: first decoder input.
        eos_id: end of sentence.
        use_cache: cached keys/values (one position per step) or full recomputation of the prefix.

    Returns:
        One Hypothesis per source row, in order.
    """
    batch = src.size(0)
    rules = _TokenRules(src.device, pad_id=model.pad_id, bos_id=bos_id, eos_id=eos_id)
    limits = max_lengths(model, src, max_len_b)  # (B,)
    longest, shortest = int(limits.max()), int(limits.min())
    stepper = _start(model, src, use_cache, capacity=longest + 1)
    alive = torch.arange(batch, device=src.device)  # original row of each live row
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=src.device)  # (n,)
    logprob = torch.zeros(batch, dtype=torch.float32, device=src.device)  # (n,)
    history = torch.zeros(batch, longest + 1, dtype=torch.long, device=src.device)  # (n, T+1)
    out: list[Hypothesis | None] = [None] * batch
    for t in range(longest + 1):
        logp = rules.logprobs(stepper, tokens)  # (n, V)
        if t >= shortest:
            logp = rules.force_eos(logp, limits.eq(t))
        step_lp, tokens = logp.max(dim=-1)  # (n,), (n,)
        logprob += step_lp
        history[:, t] = tokens
        done = tokens.eq(eos_id)
        if not bool(done.any()):
            continue
        finished = done.nonzero().squeeze(1)
        norm = length_penalty(float(t + 1), alpha)
        rows, origs, lp_sums = finished.tolist(), alive[finished].tolist(), logprob[finished].tolist()
        for row, orig, lp_sum in zip(rows, origs, lp_sums, strict=True):
            out[orig] = Hypothesis(history[row, :t].tolist(), lp_sum / norm, lp_sum)
        keep = (~done).nonzero().squeeze(1)  # (n',)
        if keep.numel() == 0:
            break
        alive, tokens, logprob, history, limits = (x[keep] for x in (alive, tokens, logprob, history, limits))
        shortest = int(limits.min())
        stepper.reorder(keep)
    return out  # type: ignore[return-value]  # every row ends by its max length


@torch.inference_mode()
def beam_search(
    model: Transformer,
    src: Tensor,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len_b: int = 50,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    use_cache: bool = True,
    early_stop: bool = True,
    check_every: int = 1,
) -> list[Hypothesis]:
    """Batched beam search with the GNMT length penalty and exact early stopping (see the module doc).

    A step reads nothing back to the host except, every ``check_every`` steps, which sentences are
    finished: the best finished hypothesis of each sentence is kept on the device (``torch.where``, no
    branch on a device value), and a finished sentence is frozen until the host looks, when it leaves the
    batch (and the search ends once none is left). On a GPU each look makes the host wait for the queued
    kernels; on a CPU it costs nothing.

    Args:
        model: the Transformer (its dropout should be off: call ``model.eval()``).
        src: (B, s) source ids ending in EOS, right-padded with PAD.
        beam_size: k, live hypotheses per sentence.
        alpha: length penalty exponent (the paper: 0.6).
        max_len_b: output tokens allowed beyond the source length (the paper: 50).
        bos_id: first decoder input.
        eos_id: end of sentence.
        use_cache: cached keys/values (one position per step) or full recomputation of the prefix.
        early_stop: stop a sentence once no live beam can beat its best finished hypothesis (exact, so
            False changes only the time taken; the tests check that).
        check_every: steps between the host's looks at the finished sentences. 1 drops a sentence as soon
            as it is finished; a larger value waits less often but decodes finished sentences a few steps
            longer (not yet measured on a GPU). The hypotheses are the same (tested); scores may differ
            in the last float bits, since other rows in the decoder batch can change a matmul's
            summation order (as another batch size does).

    Returns:
        The best finished Hypothesis per source row, in order.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size!r}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    batch, k, device = src.size(0), beam_size, src.device
    rules = _TokenRules(device, pad_id=model.pad_id, bos_id=bos_id, eos_id=eos_id)
    limits = max_lengths(model, src, max_len_b)  # (n,)
    longest, shortest = int(limits.max()), int(limits.min())
    stepper = _start(model, src, use_cache, capacity=longest + 1)  # one row per sentence, then k
    bound_norm = length_penalty(limits.float() + 1.0, alpha)  # (n,) lp of the longest possible hypothesis
    alive = torch.arange(batch, device=device)  # (n,) original sentence of each live sentence
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (n,) its best can no longer change
    # Live beams: log-probabilities (n, r), histories (n, r, T+1) and the rows of the decoder batch (n*r),
    # sentence-major. r = 1 for the first step (every beam would start from the same BOS), then k.
    scores = torch.zeros(batch, 1, device=device)  # (n, r)
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)  # (n*r,)
    history = torch.zeros(batch, 1, longest + 1, dtype=torch.long, device=device)  # (n, r, T+1)
    best_score = torch.full((batch,), float("-inf"), device=device)  # (B,) best finished, by original row
    best_logprob = torch.zeros(batch, device=device)  # (B,)
    best_tokens = torch.zeros(batch, longest + 1, dtype=torch.long, device=device)  # (B, T+1)
    best_len = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
    ranks = torch.arange(2 * k, device=device)  # (2k,)
    for t in range(longest + 1):
        n, r = scores.shape
        logp = rules.logprobs(stepper, tokens)  # (n*r, V)
        if t >= shortest:
            logp = rules.force_eos(logp, limits.eq(t).repeat_interleave(r))
        # The best 2k of all r*V continuations are among the best 2k of each beam's V: rank per beam first,
        # so no (n, r*V) sum is ever written.
        width = min(2 * k, logp.size(1))
        row_lp, row_tok = logp.topk(width, dim=1)  # (n*r, w), (n*r, w)
        cand = (scores.view(n * r, 1) + row_lp).view(n, r * width)  # (n, r*w)
        top_lp, top_pos = cand.topk(min(2 * k, r * width), dim=1)  # (n, 2k) best first
        top_beam = top_pos // width  # (n, 2k)
        top_tok = row_tok.view(n, r * width).gather(1, top_pos)  # (n, 2k)
        if top_lp.size(1) < 2 * k:  # a vocabulary smaller than 2k: pad with impossible candidates
            extra = (0, 2 * k - top_lp.size(1))
            top_lp = F.pad(top_lp, extra, value=float("-inf"))
            top_beam, top_tok = F.pad(top_beam, extra), F.pad(top_tok, extra, value=model.pad_id)
        is_eos = top_tok.eq(eos_id)  # (n, 2k)

        # EOS among the top k ranks: finished hypotheses of length t (+ EOS). The best of them replaces the
        # sentence's best if it scores higher and the sentence is not finished (frozen).
        fin = is_eos[:, :k] & top_lp[:, :k].isfinite()  # (n, k)
        fin_score = torch.where(fin, top_lp[:, :k] / length_penalty(float(t + 1), alpha), float("-inf"))
        cand_best, cand_j = fin_score.max(dim=1, keepdim=True)  # (n, 1), (n, 1)
        better = (cand_best[:, 0] > best_score[alive]) & ~finished  # (n,)
        cand_beam = top_beam.gather(1, cand_j)[:, 0]  # (n,)
        cand_tokens = history[torch.arange(n, device=device), cand_beam]  # (n, T+1), first t are its tokens
        best_score[alive] = torch.where(better, cand_best[:, 0], best_score[alive])
        best_logprob[alive] = torch.where(better, top_lp.gather(1, cand_j)[:, 0], best_logprob[alive])
        best_tokens[alive] = torch.where(better[:, None], cand_tokens, best_tokens[alive])
        best_len[alive] = torch.where(better, t, best_len[alive])

        # the first k non-EOS candidates stay live (there are at least k: each beam gives at most one EOS)
        order = (ranks + is_eos * (2 * k)).argsort(dim=1)[:, :k]  # (n, k)
        scores = top_lp.gather(1, order)  # (n, k)
        beam = top_beam.gather(1, order)  # (n, k)
        tokens = top_tok.gather(1, order)  # (n, k)
        history = history.gather(1, beam[:, :, None].expand(-1, -1, history.size(2)))  # (n, k, T+1)
        history[:, :, t] = tokens
        rows_index = (torch.arange(n, device=device)[:, None] * r + beam).view(n * k)  # (n*k,) rows of n*r

        # a sentence is finished at its max length, or (exact early stop) once no live beam can still beat
        # its best finished hypothesis
        finished |= limits.eq(t)
        if early_stop:
            finished |= best_score[alive] >= scores.max(dim=1).values / bound_norm
        rows_change = r != k  # the first step: one row per sentence becomes k
        if (t + 1) % check_every == 0 or t == longest:
            keep = (~finished).nonzero().squeeze(1)  # (n',): the host's one read
            if keep.numel() == 0:
                break
            if keep.numel() < n:  # finished sentences leave the batch
                alive, scores, tokens, history = alive[keep], scores[keep], tokens[keep], history[keep]
                limits, bound_norm, finished = limits[keep], bound_norm[keep], finished[keep]
                rows_index = rows_index.view(n, k)[keep].view(-1)  # (n'*k,)
                shortest = int(limits.min())
                rows_change = True
        if rows_change:
            stepper.reorder(rows_index)
        else:  # beams permuted within their sentences: the per-sentence state stays as it is
            stepper.reorder_beams(rows_index)
        tokens = tokens.reshape(-1)  # (n*k,)
    lengths, scores_out, logprobs = best_len.tolist(), best_score.tolist(), best_logprob.tolist()
    return [
        Hypothesis(best_tokens[i, : lengths[i]].tolist(), scores_out[i], logprobs[i]) for i in range(batch)
    ]


# ----------------------------------------------------------------------------------------------------------
# Sentences in, sentences out


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration; the previous training flag comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Tensor:
    """Right-pad id lists into a (b, max_len) long tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (b, width)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out.to(device)


def encode_sources(
    tokenizer: Tokenizer, sentences: Sequence[str], *, max_src_len: int | None = None
) -> list[list[int] | None]:
    """``encode(s) + [EOS]`` per sentence, None for an empty line; over-long ones truncated with a warning.

    ``max_src_len`` counts the EOS. Truncation keeps the first ``max_src_len - 1`` subwords.
    """
    nonempty = [i for i, s in enumerate(sentences) if s.strip()]
    ids = tokenizer.encode_batch([sentences[i] for i in nonempty]) if nonempty else []
    out: list[list[int] | None] = [None] * len(sentences)
    truncated: list[tuple[int, int]] = []
    for i, seq in zip(nonempty, ids, strict=True):
        if max_src_len is not None and len(seq) + 1 > max_src_len:
            truncated.append((i, len(seq) + 1))
            seq = seq[: max_src_len - 1]
        out[i] = [*seq, tokenizer.eos_id]
    if truncated:
        log.warning(
            "truncated %d of %d input lines to %d tokens (first: line %d, %d tokens; longest %d)",
            len(truncated), len(sentences), max_src_len, truncated[0][0] + 1, truncated[0][1],
            max(n for _, n in truncated),
        )  # fmt: skip
    return out


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len_b: int = 50,
    batch_size: int = 64,
    max_src_len: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Translate sentences: length-sorted batches, detokenized output in input order.

    Empty (or blank) lines give empty outputs without being decoded. Inputs longer than ``max_src_len``
    tokens (EOS included), or than the learned position table, are truncated with one logged warning.
    ``beam_size=1`` runs greedy search.

    Args:
        model: the Transformer; dropout is switched off for the call.
        tokenizer: the run's shared subword tokenizer.
        sentences: source sentences, one per line.
        beam_size: k (the paper: 4).
        alpha: length penalty (the paper: 0.6).
        max_len_b: output tokens allowed beyond the source length (the paper: 50).
        batch_size: sentences decoded at once.
        max_src_len: truncate sources to this many tokens, EOS included (None: only the position table).
        progress: show a progress bar on stderr.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    limits = [x for x in (max_src_len, position_limit(model)) if x is not None]
    srcs = encode_sources(tokenizer, sentences, max_src_len=min(limits) if limits else None)
    order = sorted((i for i, s in enumerate(srcs) if s is not None), key=lambda i: -len(srcs[i]))  # type: ignore[arg-type]
    device = next(model.parameters()).device
    out = [""] * len(sentences)
    with eval_mode(model), _progress(progress, len(order)) as advance:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_batch([srcs[i] for i in chunk], model.pad_id, device)  # type: ignore[misc]  # (b, s)
            kw = dict(max_len_b=max_len_b, alpha=alpha, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
            if beam_size == 1:
                hyps = greedy_search(model, src, **kw)
            else:
                hyps = beam_search(model, src, beam_size=beam_size, **kw)
            for i, hyp in zip(chunk, hyps, strict=True):
                out[i] = tokenizer.decode(hyp.tokens)
            advance(len(chunk))
    return out


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator:
    """A rich progress bar on stderr (sentences done), or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task("translate", total=total)
        yield lambda n: bar.advance(task, n)
