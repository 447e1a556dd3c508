"""Corpora: the synthetic generator's rules, the text and SGML readers, one-line errors, WMT14 offline."""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from transformer_lit import corpora, synthetic
from transformer_lit.config import DataConfig
from transformer_lit.corpora import CorpusError, corpus_key, load_corpus, read_parallel, resolve_prefix

FIXTURES = Path(__file__).parent / "fixtures" / "corpora"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data folder {SHARED} is absent")
SMALL = DataConfig(synthetic_pairs=3000, synthetic_eval_pairs=200)


def tokens(text: str) -> list[str]:
    return text.replace(",", " ,").replace(".", " .").split()


@pytest.fixture(scope="module")
def small() -> corpora.Corpus:
    return load_corpus(SMALL)


# ----------------------------------------------------------------------------------------------------------
# The synthetic corpus


def test_synthetic_is_deterministic_and_seeded() -> None:
    first, again, other = (
        synthetic.generate(0, 500, 50),
        synthetic.generate(0, 500, 50),
        synthetic.generate(1, 500, 50),
    )
    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))


def test_synthetic_splits_have_their_sizes_and_do_not_overlap(small: corpora.Corpus) -> None:
    assert (len(small.train), len(small.dev), len(small.test)) == (3000, 200, 200)
    sources = [{s for s, _ in split} for split in (small.train, small.dev, small.test)]
    assert [len(s) for s in sources] == [3000, 200, 200]  # no duplicate inside a split
    assert not sources[0] & sources[1] and not sources[0] & sources[2] and not sources[1] & sources[2]


def test_synthetic_test_sentences_are_longer_than_any_training_sentence(small: corpora.Corpus) -> None:
    train_max = max(len(tokens(s)) for s, _ in small.train + small.dev)
    assert train_max <= synthetic.TRAIN_LENGTHS[1] < min(len(tokens(s)) for s, _ in small.test)
    assert max(len(tokens(s)) for s, _ in small.test) <= synthetic.TEST_LENGTHS[1]


def test_synthetic_dev_and_test_do_not_depend_on_the_training_size(small: corpora.Corpus) -> None:
    bigger = load_corpus(DataConfig(synthetic_pairs=3500, synthetic_eval_pairs=200))
    assert bigger.dev == small.dev and bigger.test == small.test and bigger.train[:3000] == small.train


def test_no_target_word_is_spelled_like_a_source_word(small: corpora.Corpus) -> None:
    source_words = synthetic.lexicon().source_words()
    target_words = {w for split in (small.train, small.test) for _, t in split for w in tokens(t)}
    assert {w for split in (small.train, small.test) for s, _ in split for w in tokens(s)} <= source_words | {
        ",",
        ".",
    }
    assert target_words & source_words == set()


def lex():
    lx = synthetic.lexicon()
    return lx, lx.nouns, lx.verbs, lx.adjectives


def test_docstring_example_pair() -> None:
    lx, n, v, a = lex()
    bank = synthetic.NP(
        lx.ambiguous["bank"], adjs=[a["big"]], mods=[(lx.prepositions["near"], synthetic.NP(n["river"]))]
    )
    sub = synthetic.Clause("sub", subj=synthetic.NP(n["farmer"]), verb=v["see"], tense="past", obj=bank)
    tree = synthetic.Clause(
        subj=synthetic.NP(pron="he"),
        verb=v["call_back"],
        tense="fut",
        obj=synthetic.NP(n["teacher"], adjs=[a["old"]]),
    )
    tree.adv, tree.front = lx.adverbs["tomorrow"], (lx.conjunctions["because"], sub)
    src, tgt = synthetic.render(tree)
    example = synthetic.__doc__.split("Example pair")[1].splitlines()[1:3]
    assert [src, tgt] == [line.strip() for line in example]


def test_reordering_verb_final_subclauses_and_separable_particles() -> None:
    lx, n, v, a = lex()

    def clause(kind: str, tense: str) -> synthetic.Clause:
        return synthetic.Clause(
            kind, subj=synthetic.NP(pron="he"), verb=v["call_back"], tense=tense, obj=synthetic.NP(n["man"])
        )

    main = synthetic.Clause(subj=synthetic.NP(n["woman"]), verb=v["laugh"], tense="pres")
    main.subs = [(lx.conjunctions["because"], clause("sub", "pres"))]
    assert synthetic.render(clause("main", "pres")) == ("he calls back the man.", "er ruft den mann zurück.")
    assert synthetic.render(main)[1] == "die frau lacht, weil er den mann zurückruft."
    assert synthetic.render(clause("main", "past"))[1] == "er hat den mann zurückgerufen."
    main.subs = [(lx.conjunctions["because"], clause("sub", "past"))]
    assert synthetic.render(main)[1] == "die frau lacht, weil er den mann zurückgerufen hat."
    late = synthetic.Clause(
        subj=synthetic.NP(n["dog"]),
        verb=v["see"],
        tense="past",
        obj=synthetic.NP(n["cat"]),
        adv=lx.adverbs["yesterday"],
    )
    assert synthetic.render(late) == (
        "the dog saw the cat yesterday.",
        "der hund hat gestern die katze gesehen.",
    )
    late.front = "adv"  # verb second: the finite verb comes before the subject
    assert synthetic.render(late) == (
        "yesterday the dog saw the cat.",
        "gestern hat der hund die katze gesehen.",
    )


def test_agreement_is_decided_by_a_distant_word() -> None:
    lx, n, v, a = lex()
    for noun, article in (
        ("dog", "ein großer alter"),
        ("cat", "eine große alte"),
        ("horse", "ein großes altes"),
    ):
        src, tgt = synthetic.render(
            synthetic.Clause(subj=synthetic.NP(n[noun], "a", adjs=[a["big"], a["old"]]), verb=v["sleep"])
        )
        assert (src, tgt) == (
            f"a big old {noun} sleeps.",
            f"{article} {synthetic.lexicon().nouns[noun].de} schläft.",
        )
    renders = []
    for plural in (False, True):
        rel = synthetic.Clause("rel", verb=v["see"], tense="past", obj=synthetic.NP(n["cat"]), role="subj")
        head = synthetic.NP(n["dog"], plural=plural, rel=rel)
        rel.head = head
        renders.append(synthetic.render(synthetic.Clause(subj=head, verb=v["sleep"], tense="past")))
    assert renders[0] == (
        "the dog that saw the cat slept.",
        "der hund, der die katze gesehen hat, hat geschlafen.",
    )
    assert renders[1] == (
        "the dogs that saw the cat slept.",
        "die hunde, die die katze gesehen haben, haben geschlafen.",
    )
    cup = synthetic.Clause(subj=synthetic.NP(n["cup"]), verb=v["fall"], tense="past")
    cup.subs = [
        (
            lx.conjunctions["because"],
            synthetic.Clause("sub", subj=synthetic.NP(pron="it"), adj=a["heavy"], tense="past"),
        )
    ]
    assert synthetic.render(cup) == (
        "the cup fell because it was heavy.",
        "die tasse ist gefallen, weil sie schwer war.",
    )


def test_ambiguous_words_are_resolved_by_context() -> None:
    lx, n, v, a = lex()

    def bank_sentence(*pps: str) -> str:
        obj = synthetic.NP(lx.ambiguous["bank"])
        c = synthetic.Clause(
            subj=synthetic.NP(n["man"]),
            verb=v["see"],
            obj=obj,
            pps=[(lx.prepositions[p], synthetic.NP(n[w])) for p, w in pps],
        )
        return synthetic.render(c)[1]

    assert bank_sentence() == "der mann sieht das geldhaus."
    assert bank_sentence(("near", "river")) == "der mann sieht das ufer beim fluss."
    assert bank_sentence(("near", "king")) == "der mann sieht das geldhaus beim könig."
    assert (
        synthetic.render(synthetic.Clause(subj=synthetic.NP(n["man"]), verb=v["run"]))[1] == "der mann läuft."
    )
    assert (
        synthetic.render(synthetic.Clause(subj=synthetic.NP(n["clock"]), verb=v["run"]))[1]
        == "die uhr funktioniert."
    )


def test_the_corpus_exercises_every_phenomenon(small: corpora.Corpus) -> None:
    pairs = small.train

    def count(src_pattern: str, tgt_pattern: str) -> int:
        return sum(1 for s, t in pairs if re.search(src_pattern, s) and re.search(tgt_pattern, t))

    verb_final = r"[^,]* (hat|haben|ist|sind|wird|werden|kann|können|muss|müssen|\w+t|\w+en)[,.]"
    assert count(r"\b(because|although|if|while)\b", r", (weil|obwohl|wenn|während) " + verb_final) > 50
    assert (
        count(r"^(yesterday|today|tomorrow|now|soon) ", r"^\w+ (hat|haben|ist|sind|wird|werden|\w+t) ") > 10
    )
    assert count(r"\b(that|who|which)\b", r", (der|die|das|den) ") > 150  # relative clauses
    it = r"^(?!.*\b(he|she|they|her)\b).*\bit\b"  # "it" is the only source of er / sie
    assert count(it, r"\ber\b") > 3 and count(it, r"\bsie\b") > 3 and count(it, r"\bes\b") > 3
    assert count(r"\bbank\b", r"\bufer\b") > 5 and count(r"\bbank\b", r"\bgeldhaus\b") > 5
    assert count(r"\bwhen\b", r"\bals\b") > 5 and count(r"\bwhen\b", r"\bwenn\b") > 20
    assert count(r"\b(inside|to|from|near) the\b", r"\b(im|zum|zur|vom|beim)\b") > 50  # contractions
    assert count(r"\btonight\b", r"\bheute abend\b") > 10 and count(r"\ba lot of\b", r"\bviel") > 20


def test_write_synthetic_reads_back_as_a_text_corpus(tmp_path: Path, small: corpora.Corpus) -> None:
    paths = corpora.write_synthetic(tmp_path, SMALL)
    assert sorted(p.name for p in paths) == sorted(
        f"{s}.{l}" for s in ("train", "dev", "test") for l in ("en", "de")
    )
    cfg = DataConfig(
        corpus="text",
        train=(str(tmp_path / "train"),),
        dev=str(tmp_path / "dev"),
        test=str(tmp_path / "test"),
    )
    again = load_corpus(cfg)
    assert (again.train, again.dev, again.test) == (small.train, small.dev, small.test)


def test_synthetic_corpus_key_covers_seed_and_sizes() -> None:
    assert corpus_key(SMALL) == corpus_key(
        DataConfig(synthetic_pairs=3000, synthetic_eval_pairs=200, vocab_size=99)
    )
    keys = {corpus_key(SMALL), corpus_key(DataConfig(synthetic_pairs=3001, synthetic_eval_pairs=200))}
    keys |= {corpus_key(DataConfig(synthetic_pairs=3000, synthetic_eval_pairs=200, synthetic_seed=1))}
    assert len(keys) == 3 and all(re.fullmatch(r"synthetic-[0-9a-f]{16}", k) for k in keys)


def test_synthetic_corpus_is_cached_on_disk_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: corpora.Corpus
) -> None:
    cfg = DataConfig(synthetic_pairs=3000, synthetic_eval_pairs=200, cache_dir=str(tmp_path))
    first = load_corpus(cfg)
    cached = tmp_path / "corpora" / f"{corpus_key(cfg)}.json"
    assert cached.is_file() and not list(cached.parent.glob("*.tmp"))
    corpora._synthetic_splits.cache_clear()  # a new process: only the file is left

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached corpus should have been read, not generated again")

    monkeypatch.setattr(synthetic, "generate", no_generation)
    again = load_corpus(cfg)
    assert (again.train, again.dev, again.test) == (first.train, first.dev, first.test)
    assert (again.train, again.dev, again.test) == (small.train, small.dev, small.test)
    assert all(type(pair) is tuple for pair in again.train[:5])


# ----------------------------------------------------------------------------------------------------------
# Text files and WMT SGML


def text_cfg(train, dev, test=None, **kw) -> DataConfig:
    return DataConfig(
        corpus="text", train=tuple(str(p) for p in train), dev=str(dev), test=test and str(test), **kw
    )


def test_text_reader_strips_and_drops_empty_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transformer_lit.corpora"):
        pairs = read_parallel(FIXTURES / "tiny.en", FIXTURES / "tiny.de")
    assert pairs == [
        ("The house is small.", "Das Haus ist klein."),
        ("Resumption of the session", "Wiederaufnahme der Sitzungsperiode"),
        ("I agree.", "Ich stimme zu."),
        ("The last line has no newline in German.", "Die letzte Zeile hat keinen Zeilenumbruch."),
    ]
    assert "dropped 1 of 5 pairs with an empty side" in caplog.text


def test_gzip_files_and_mixed_splits(tmp_path: Path) -> None:
    for lang in ("en", "de"):
        (tmp_path / f"zipped.{lang}.gz").write_bytes(gzip.compress((FIXTURES / f"tiny.{lang}").read_bytes()))
    assert resolve_prefix(str(tmp_path / "zipped"), "en", "de")[0].name == "zipped.en.gz"
    cfg = text_cfg([tmp_path / "zipped", FIXTURES / "tiny"], FIXTURES / "tiny", FIXTURES / "news")
    corpus = load_corpus(cfg)
    assert corpus.train == read_parallel(FIXTURES / "tiny.en", FIXTURES / "tiny.de") * 2
    assert len(corpus.dev) == 4 and len(corpus.test) == 4


def test_sgml_pairs_segments_by_document_and_id() -> None:
    src, tgt, fmt = resolve_prefix(str(FIXTURES / "news"), "en", "de")
    assert (src.name, tgt.name, fmt) == ("news-src.en.sgm", "news-ref.de.sgm", "sgml")
    assert resolve_prefix(str(src), "en", "de") == (src, tgt, "sgml")  # a .sgm file names its pair
    pairs = read_parallel(src, tgt, "sgml")
    assert pairs == [
        ("Gutach: Increased safety for pedestrians", "Gutach: Noch mehr Sicherheit für Fußgänger"),
        ('Standard & Poor\'s said "no" <again>.', 'Standard & Poor\'s sagte "nein" <wieder>.'),
        ("The match ended 2-1.", "Das Spiel endete 2:1."),
        ("Kensington & Chelsea won.", "Kensington & Chelsea hat gewonnen."),
    ]


def test_a_sentence_with_a_unicode_line_separator_stays_one_line(tmp_path: Path) -> None:
    (tmp_path / "nel.en").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "nel.de").write_text("eins mit \u0085 drin\nzwei\u2028drei\n", encoding="utf-8")
    assert len(read_parallel(tmp_path / "nel.en", tmp_path / "nel.de")) == 2


@needs_shared
def test_real_wmt_files_plain_and_sgml() -> None:
    news = SHARED / "wmt_news_deen_other_years"
    cfg = text_cfg(
        [SHARED / "europarl_v7_deen_first20k" / "train", news / "newstest2010", news / "newssyscomb2009"],
        SHARED / "wmt_newstest_deen" / "newstest2013",
        SHARED / "newstest2014_deen_sgm" / "newstest2014-deen",
    )
    corpus = load_corpus(cfg)
    assert (len(corpus.train), len(corpus.dev), len(corpus.test)) == (20000 + 2489 + 502, 3000, 3003)
    assert corpus.train[0] == ("Resumption of the session", "Wiederaufnahme der Sitzungsperiode")
    plain = read_parallel(
        SHARED / "wmt_newstest_deen" / "newstest2014.en", SHARED / "wmt_newstest_deen" / "newstest2014.de"
    )
    assert corpus.test == [(" ".join(s.split()), " ".join(t.split())) for s, t in plain]
    reverse = load_corpus(
        text_cfg(
            [news / "newstest2010"],
            SHARED / "newstest2014_deen_sgm" / "newstest2014-deen",
            src_lang="de",
            tgt_lang="en",
        )
    )
    assert reverse.dev[0] == (
        "Gutach: Noch mehr Sicherheit für Fußgänger",
        "Gutach: Increased safety for pedestrians",
    )


@needs_shared
def test_real_text_corpus_key_follows_the_files(tmp_path: Path) -> None:
    for lang in ("en", "de"):
        shutil.copy(SHARED / "wmt_newstest_deen" / f"newstest2013.{lang}", tmp_path / f"dev.{lang}")
    cfg = text_cfg([SHARED / "wmt_news_deen_other_years" / "newstest2009"], tmp_path / "dev")
    key = corpus_key(cfg)
    assert key == corpus_key(cfg) and key.startswith("text-")
    assert (
        corpus_key(text_cfg([SHARED / "wmt_news_deen_other_years" / "newstest2010"], tmp_path / "dev")) != key
    )
    (tmp_path / "dev.en").write_text("changed\n")
    (tmp_path / "dev.de").write_text("geändert\n")
    assert corpus_key(cfg) != key


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line each, naming the files


def error(cfg_or_call) -> str:
    with pytest.raises(CorpusError) as info:
        cfg_or_call() if callable(cfg_or_call) else load_corpus(cfg_or_call)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path: Path) -> None:
    (tmp_path / "m.en").write_text("a\nb\nc\n")
    (tmp_path / "m.de").write_text("a\nb\n")
    message = error(text_cfg([tmp_path / "m"], FIXTURES / "tiny"))
    assert f"{tmp_path / 'm.en'} has 3 lines" in message and f"{tmp_path / 'm.de'} has 2" in message


def test_missing_file_names_the_path_tried(tmp_path: Path) -> None:
    message = error(text_cfg([FIXTURES / "tiny"], tmp_path / "nowhere"))
    assert message.startswith("data.dev: missing file") and str(tmp_path / "nowhere.en") in message
    (tmp_path / "half.en").write_text("a\n")
    assert str(tmp_path / "half.de") in error(text_cfg([tmp_path / "half"], FIXTURES / "tiny"))
    assert "data.train must name" in error(DataConfig(corpus="text", dev=str(FIXTURES / "tiny")))
    assert "data.dev must name" in error(DataConfig(corpus="text", train=(str(FIXTURES / "tiny"),)))


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "latin.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "latin.de").write_bytes("eins\nzwei\nGrüße\n".encode("latin-1"))
    message = error(text_cfg([tmp_path / "latin"], FIXTURES / "tiny"))
    assert str(tmp_path / "latin.de") in message and "line 3 is not valid UTF-8" in message
    (tmp_path / "bad.en.gz").write_bytes(b"not gzip")
    (tmp_path / "bad.de").write_text("x\n")
    assert str(tmp_path / "bad.en.gz") in error(text_cfg([tmp_path / "bad"], FIXTURES / "tiny"))


def test_empty_corpus_and_unknown_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.en").write_text("\n\n")
    (tmp_path / "empty.de").write_text("x\n\n")
    message = error(text_cfg([tmp_path / "empty"], FIXTURES / "tiny"))
    assert message.startswith("empty corpus: the train files") and str(tmp_path / "empty.en") in message
    assert "data.corpus must be one of synthetic, text, wmt14, got 'europarl'" in error(
        DataConfig(corpus="europarl")
    )
    assert "got 'europarl'" in error(lambda: corpus_key(DataConfig(corpus="europarl")))


def test_sgml_errors(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "news-src.en.sgm", tmp_path / "t-src.en.sgm")
    ref = (FIXTURES / "news-ref.de.sgm").read_text().replace('<seg id="1">Das Spiel', '<seg id="9">Das Spiel')
    (tmp_path / "t-ref.de.sgm").write_text(ref)
    assert "segment 1 of document '2-sport' has no counterpart" in error(
        text_cfg([FIXTURES / "tiny"], tmp_path / "t")
    )
    (tmp_path / "t-ref.de.sgm").write_text(ref.replace('<seg id="9">Das Spiel endete 2:1.</seg>\n', ""))
    assert "has 4 segments but" in error(text_cfg([FIXTURES / "tiny"], tmp_path / "t"))
    (tmp_path / "t-ref.de.sgm").unlink()
    assert str(tmp_path / "t-ref.de.sgm") in error(text_cfg([FIXTURES / "tiny"], tmp_path / "t"))


# ----------------------------------------------------------------------------------------------------------
# WMT14: never downloads implicitly (downloading and its failures: test_wmt14.py)


def test_wmt14_unprepared_folder_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("load_corpus must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    message = error(DataConfig(corpus="wmt14", cache_dir=str(tmp_path)))
    assert f"WMT14 is not prepared in {tmp_path / 'wmt14'}" in message and "tlit data wmt14 --out" in message
    assert "data.corpus=text" in message


def test_synthetic_max_words_shortens_train_and_keeps_test_longer():
    cfg = DataConfig(synthetic_pairs=300, synthetic_eval_pairs=40, synthetic_max_words=12)
    corpus = load_corpus(cfg)
    longest_train = max(len(src.replace(",", " ,").replace(".", " .").split()) for src, _ in corpus.train)
    shortest_test = min(len(src.replace(",", " ,").replace(".", " .").split()) for src, _ in corpus.test)
    assert longest_train <= 12 < shortest_test
    assert corpus_key(cfg) != corpus_key(DataConfig(synthetic_pairs=300, synthetic_eval_pairs=40))
