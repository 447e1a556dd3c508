"""Metrics: perplexity, sacreBLEU parity, the paper's compound-split BLEU by hand, paired bootstrap."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from transformer_lit.metrics import (
    paired_bootstrap,
    paper_tokenize,
    perplexity,
    sacre_bleu,
    split_compounds,
    tokenized_bleu,
)

REFS = [
    "The cat sat on the mat.",
    "Der Hals-Nasen-Ohren-Arzt hat heute geöffnet, sagt sie.",
    "It's 3.5 km to the station; take the U-Bahn!",
    "Wir sehen uns morgen um 10 Uhr.",
]
HYPS = [
    "The cat sat on a mat.",
    "Der Hals-Nasen-Arzt ist heute offen, sagt sie.",
    "It is 3.5 km to the station, take the U-Bahn!",
    "Wir sehen uns morgen um 10 Uhr.",
]


def test_perplexity() -> None:
    assert perplexity(10 * math.log(2.0), 10) == pytest.approx(2.0)
    assert perplexity(0.0, 3) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="num_tokens must be positive, got 0"):
        perplexity(1.0, 0)


def test_sacre_bleu_equals_sacrebleu_corpus_bleu() -> None:
    score, signature = sacre_bleu(HYPS, REFS)
    expected = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert score == pytest.approx(expected.score, abs=1e-9)
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert sacre_bleu(REFS, REFS)[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="equally many"):
        sacre_bleu(HYPS, REFS[:2])


def test_compound_split_is_the_perl_one_liner() -> None:
    # perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g': matches do not overlap, so one-letter parts between
    # two hyphens keep the second hyphen, exactly as in tensor2tensor's get_ende_bleu.sh
    assert split_compounds("rich-text format") == "rich ##AT##-##AT## text format"
    assert split_compounds("Hals-Nasen-Arzt") == "Hals ##AT##-##AT## Nasen ##AT##-##AT## Arzt"
    assert split_compounds("a-b-c") == "a ##AT##-##AT## b-c"
    assert split_compounds("x - y, -z, w-") == "x - y, -z, w-"
    # Moses tokenization first (tokenizer.perl -l de, with its default escaping), then the split
    assert (
        paper_tokenize('Ein "Hals-Nasen-Arzt".')
        == "Ein &quot; Hals ##AT##-##AT## Nasen ##AT##-##AT## Arzt &quot; ."
    )


def test_tokenized_bleu_hand_worked_example() -> None:
    ref = "Das ist ein Hals-Nasen-Arzt."
    hyp = "Das ist ein Nasen-Arzt."
    # Tokenized + split:
    #   ref: Das ist ein Hals ##AT##-##AT## Nasen ##AT##-##AT## Arzt .   (9 tokens)
    #   hyp: Das ist ein Nasen ##AT##-##AT## Arzt .                      (7 tokens)
    # 1-grams: all 7 hyp tokens occur in ref (##AT##-##AT## twice in ref)   -> 7/7
    # 2-grams: Das ist, ist ein, Nasen ##AT##, ##AT## Arzt, Arzt . match;
    #          "ein Nasen" does not (ref: ein Hals)                         -> 5/6
    # 3-grams: Das ist ein, Nasen ##AT## Arzt, ##AT## Arzt . match         -> 3/5
    # 4-grams: only "Nasen ##AT##-##AT## Arzt ." matches                   -> 1/4
    # BP = exp(1 - 9/7); BLEU = BP * (1 * 5/6 * 3/5 * 1/4) ** (1/4) = exp(-2/7) * (1/8) ** (1/4)
    expected = 100 * math.exp(-2 / 7) * (1 / 8) ** 0.25  # 44.68
    assert tokenized_bleu([hyp], [ref]) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(44.68, abs=0.01)
    # it is a different number from sacreBLEU on the same text, and must stay separately named
    assert sacre_bleu([hyp], [ref])[0] != pytest.approx(expected, abs=0.1)


def test_tokenized_bleu_is_unsmoothed_like_multi_bleu() -> None:
    # no 4-gram in common: multi-bleu.perl gives 0
    assert tokenized_bleu(["a b c d e"], ["a b c x d e"]) == 0.0
    assert tokenized_bleu(REFS, REFS) == pytest.approx(100.0)


def test_paired_bootstrap() -> None:
    refs = REFS * 10
    good = list(refs)
    bad = ["the", "der", "it", "wir"] * 10
    p = paired_bootstrap(bad, good, refs, n=200, seed=7)
    assert p < 0.05
    assert p == paired_bootstrap(bad, good, refs, n=200, seed=7)  # seeded: reproducible
    assert paired_bootstrap(good, good, refs, n=200) == 1.0
    with pytest.raises(ValueError, match="seed must be non-zero"):
        paired_bootstrap(bad, good, refs, seed=0)
