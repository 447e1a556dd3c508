"""The shared BPE vocabulary: round trip, fixed special ids, files, and the cache keyed by corpus and size."""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import pytest

from transformer_lit import tokenizer as tk
from transformer_lit.config import DataConfig
from transformer_lit.corpora import Corpus
from transformer_lit.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_or_train_tokenizer

WORDS_EN = "the a cat dog house river sees likes quickly old small green über naïve café runs".split()  # noqa: SIM905
WORDS_DE = "der die katze hund haus fluss sieht mag schnell alt klein grün über straße müde läuft".split()  # noqa: SIM905


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def sentence(words: list[str]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 15))).capitalize() + "."

    return [(sentence(WORDS_EN), sentence(WORDS_DE)) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tk.train_tokenizer(tk.sample_training_text(make_pairs(600)), 200)


def test_round_trip_plain_text(tok: Tokenizer) -> None:
    for src, tgt in make_pairs(50, seed=1):
        for text in (src, tgt):
            ids = tok.encode(text)
            assert ids and all(0 <= i < tok.vocab_size for i in ids)
            assert tok.decode(ids) == text
    texts = [p[0] for p in make_pairs(20, seed=2)]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_special_ids_are_fixed_and_dropped_by_decode(tok: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    text = "The old cat sees the river."
    ids = tok.encode(text)
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)  # encode adds no specials
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor([BOS_ID, *ids, EOS_ID])) == text
    assert tok.id_to_piece(UNK_ID) == "<unk>"


def test_too_small_corpus_gives_a_smaller_vocabulary_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transformer_lit.tokenizer"):
        small = tk.train_tokenizer(["a cat sees a dog", "der hund sieht"], 1000)
    assert 4 < small.vocab_size < 1000
    assert f"BPE vocabulary has {small.vocab_size} pieces, fewer than data.vocab_size=1000" in caplog.text


def test_large_vocabulary_spells_unseen_characters_as_bytes() -> None:
    big = tk.train_tokenizer(tk.sample_training_text(make_pairs(300)), tk.BYTE_FALLBACK_MIN_VOCAB)
    text = "The cat Ωmega ✓ naïve."
    assert UNK_ID not in big.encode(text)
    assert big.decode(big.encode(text)) == text


def test_save_load_and_pickle(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "run" / "tokenizer.model"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temporary file left
    loaded = Tokenizer.load(path)
    text = "Der müde hund läuft schnell."
    assert loaded.vocab_size == tok.vocab_size and loaded.encode(text) == tok.encode(text)
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")


def test_cache_reuses_and_retrains_on_corpus_or_size_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_train = tk.train_tokenizer

    def counting_train(texts, vocab_size, **kwargs):  # noqa: ANN001, ANN202
        calls.append(vocab_size)
        return real_train(texts, vocab_size, **kwargs)

    monkeypatch.setattr(tk, "train_tokenizer", counting_train)
    corpus = Corpus(make_pairs(300), [], [], "stand-in")
    cfg = DataConfig(vocab_size=150, cache_dir=str(tmp_path))

    first = load_or_train_tokenizer(cfg, corpus, key="corpus-a")
    files = list((tmp_path / "tokenizers").glob("*/tokenizer.model"))
    assert len(files) == 1 and calls == [150]
    mtime = files[0].stat().st_mtime_ns

    again = load_or_train_tokenizer(cfg, corpus, key="corpus-a")
    assert calls == [150] and files[0].stat().st_mtime_ns == mtime  # reused, not retrained
    assert again.encode("the cat") == first.encode("the cat")

    load_or_train_tokenizer(DataConfig(vocab_size=120, cache_dir=str(tmp_path)), corpus, key="corpus-a")
    load_or_train_tokenizer(cfg, corpus, key="corpus-b")
    assert calls == [150, 120, 150]
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.model"))) == 3
    assert not list((tmp_path / "tokenizers").glob("*/*.tmp"))


def test_cache_key_changes_with_every_input() -> None:
    assert tk.cache_key("a", 100) == tk.cache_key("a", 100)
    assert len({tk.cache_key("a", 100), tk.cache_key("b", 100), tk.cache_key("a", 101)}) == 3
    assert tk.content_key([("a", "b")]) != tk.content_key([("a", "c")])


def test_training_sample_is_bounded_and_deterministic() -> None:
    pairs = make_pairs(500)
    sample = tk.sample_training_text(pairs, max_sentences=100)
    assert len(sample) == 100 and sample == tk.sample_training_text(pairs, max_sentences=100)
    assert len(tk.sample_training_text(pairs[:10])) == 20
