"""Evaluation metrics: per-token perplexity, sacreBLEU, the paper's tokenized BLEU and a significance test.

Two BLEU numbers are reported and never mixed:

- ``sacre_bleu``: sacreBLEU on detokenized text (its own 13a tokenizer), with the signature string that makes
  the number reproducible. This is the number to compare across papers today.
- ``tokenized_bleu``: the number "Attention Is All You Need" reports, computed like tensor2tensor's
  ``get_ende_bleu.sh``: Moses ``tokenizer.perl`` on hypothesis and reference, compounds split as
  ``a-b`` -> ``a ##AT##-##AT## b``, then ``multi-bleu.perl`` (BLEU on the tokens, no smoothing).

Everything that a library already does (Moses tokenization, BLEU, paired bootstrap) is delegated to it
(sacremoses, sacrebleu); only the compound split, a one-line Perl regex, is written here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

from sacrebleu.metrics import BLEU

# get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'. Python's re.sub scans like Perl's /g:
# matches do not overlap, so "a-b-c" -> "a ##AT##-##AT## b-c", exactly as the Perl one-liner does.
_COMPOUND = re.compile(r"(\S)-(\S)")


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """Per-token perplexity ``exp(nll_sum / num_tokens)`` of the gold targets.

    Args:
        nll_sum: summed negative log-likelihood (natural log) of the gold tokens, without label smoothing.
        num_tokens: number of scored target tokens (the paper counts subword tokens, EOS included).

    Returns:
        The perplexity; ``inf`` when the mean NLL overflows ``exp``.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens!r}")
    mean = nll_sum / num_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def _check_pair(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"hypotheses and references must be equally many, got {len(hyps)} and {len(refs)}")
    if not hyps:
        raise ValueError("BLEU needs at least one sentence, got 0 hypotheses")


def sacre_bleu(hyps: Sequence[str], refs: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU of detokenized hypotheses against one reference each.

    Returns:
        ``(score, signature)``, the signature such as
        ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``.
    """
    _check_pair(hyps, refs)
    bleu = BLEU()
    score = bleu.corpus_score(list(hyps), [list(refs)])
    return score.score, str(bleu.get_signature())


@lru_cache(maxsize=8)
def _moses(lang: str):  # noqa: ANN202 - sacremoses has no type stubs
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)


def split_compounds(text: str) -> str:
    """``a-b`` -> ``a ##AT##-##AT## b`` (tensor2tensor's get_ende_bleu.sh, after Moses tokenization)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def paper_tokenize(text: str, lang: str = "de") -> str:
    """Moses tokenization (``tokenizer.perl -l LANG``, default escaping) followed by the compound split."""
    return split_compounds(_moses(lang).tokenize(text, return_str=True, escape=True))


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], *, lang: str = "de") -> float:
    """The paper's BLEU: Moses-tokenized, compound-split, case-sensitive BLEU on tokens, unsmoothed.

    Matches tensor2tensor's ``get_ende_bleu.sh`` (tokenizer.perl, the ``##AT##`` split, multi-bleu.perl).
    multi-bleu.perl does no smoothing (any zero n-gram precision gives 0), hence ``smooth_method="none"``.

    Args:
        hyps: detokenized hypotheses.
        refs: detokenized references, one per hypothesis.
        lang: language of the Moses tokenizer (the target language).
    """
    _check_pair(hyps, refs)
    tok_hyps = [paper_tokenize(h, lang) for h in hyps]
    tok_refs = [paper_tokenize(r, lang) for r in refs]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(tok_hyps, [tok_refs]).score


@contextmanager
def _sacrebleu_seed(seed: int) -> Iterator[None]:
    """sacrebleu's PairedTest reads its seed from SACREBLEU_SEED; set it for the duration of one test."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = old


def paired_bootstrap(
    base_hyps: Sequence[str],
    sys_hyps: Sequence[str],
    refs: Sequence[str],
    *,
    n: int = 1000,
    seed: int = 12345,
) -> float:
    """p-value of sacreBLEU's paired bootstrap resampling test (Koehn 2004) of ``sys`` against ``base``.

    Uses ``sacrebleu.significance.PairedTest(test_type="bs")``, the same code as
    ``sacrebleu -paired-bs``: a small p-value means the difference in BLEU is unlikely to be chance.

    Args:
        base_hyps: hypotheses of the baseline system.
        sys_hyps: hypotheses of the system compared to it.
        refs: one reference per sentence.
        n: bootstrap resamples.
        seed: RNG seed; sacrebleu treats 0 as "unseeded", so it must be non-zero (its default is 12345).

    Returns:
        The p-value; 1.0 when both systems output exactly the same text (sacrebleu would return
        ``1 / (n + 1)`` there, because its count of resampled differences uses a strict ``>``).
    """
    from sacrebleu.significance import PairedTest

    _check_pair(base_hyps, refs)
    _check_pair(sys_hyps, refs)
    if seed == 0:
        raise ValueError("seed must be non-zero (sacrebleu treats 0 as unseeded), got 0")
    if n <= 0:
        raise ValueError(f"n must be a positive number of resamples, got {n!r}")
    if list(base_hyps) == list(sys_hyps):
        return 1.0
    with _sacrebleu_seed(seed):
        test = PairedTest(
            [("base", list(base_hyps)), ("sys", list(sys_hyps))],
            {"BLEU": BLEU(references=[list(refs)])},
            references=None,
            test_type="bs",
            n_samples=n,
        )
        _, scores = test()
    return float(scores["BLEU"][1].p_value)
