"""One subword vocabulary shared by source and target: byte-pair encoding trained with sentencepiece.

The paper (Section 5.1) encodes WMT14 En-De with byte-pair encoding into a shared source-target vocabulary
of about 37,000 tokens. Sharing one vocabulary is what lets the model tie its source embedding, target
embedding and pre-softmax projection (Section 3.4). We train sentencepiece's BPE on the training text of
both sides; ``decode`` gives back detokenized plain text, which is what sacreBLEU scores.

Special ids are fixed for every vocabulary, so batches, masks and decoding never have to ask:
``PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3``.

Text is normalised with sentencepiece's ``nmt_nfkc`` rule (NFKC plus whitespace clean-up), so
``decode(encode(x)) == x`` holds for NFKC-normalised text with single spaces. Vocabularies of 4096 pieces
or more reserve 256 byte pieces (``byte_fallback``): a character outside the vocabulary is spelt as UTF-8
bytes instead of becoming ``<unk>``. Smaller vocabularies (the tiny synthetic corpus) cover every character
seen in training instead, because 256 byte pieces would crowd out the merges.

Trained vocabularies are cached under ``cfg.cache_dir/tokenizers/<key>/tokenizer.model``; the key hashes
the corpus (``corpora.corpus_key``), the requested size and every training setting, so a second run reuses
the file and a change of corpus or size trains a new one. The cache file is written to a temporary file
and renamed, so two processes training the same vocabulary at once cannot leave a torn file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from transformer_lit.atomic import write_atomic

if TYPE_CHECKING:
    from transformer_lit.config import DataConfig
    from transformer_lit.corpora import Corpus

log = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
SPECIAL_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID})
"""Ids that ``decode`` drops (UNK is kept: it decodes to a visible marker)."""

MODEL_FILE = "tokenizer.model"
MAX_TRAIN_SENTENCES = 400_000
"""Sentences (source and target together) sampled to train a vocabulary: enough for stable merges, and
training stays in seconds even on WMT14's 9M sentences."""
BYTE_FALLBACK_MIN_VOCAB = 4096
SETTINGS_VERSION = 1
"""Bump when training changes in a way the settings below do not capture, to retire old cache entries."""


class Tokenizer:
    """A trained sentencepiece model with the project's fixed special ids.

    Args:
        model_proto: the serialized sentencepiece model (the bytes of ``tokenizer.model``).
        source: where it came from, for error messages.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        want = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
        if got != want:
            raise ValueError(f"{source}: special ids (pad, unk, bos, eos) must be {want}, got {got}")
        self.vocab_size: int = self._sp.get_piece_size()

    @property
    def proto(self) -> bytes:
        """The serialized model (the bytes of ``tokenizer.model``)."""
        return self._proto

    # -- encoding ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Subword ids of one sentence, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Ids of many sentences at once (sentencepiece's multi-threaded batch encoder)."""
        if not texts:
            return []
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Detokenized plain text (for sacreBLEU); PAD, BOS and EOS are dropped, UNK shows as `` ⁇ ``."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids if int(i) not in SPECIAL_IDS])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # -- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.model`` (the single file that ``load`` needs), atomically."""
        write_atomic(path, self._proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(path.read_bytes(), source=str(path))

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers and multiprocessing pickle it
        return {"proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def tokenizer_settings(vocab_size: int) -> dict[str, Any]:
    """Every setting that changes the trained model; part of the cache key."""
    byte_fallback = vocab_size >= BYTE_FALLBACK_MIN_VOCAB
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "byte_fallback": byte_fallback,
        "character_coverage": 0.9999 if byte_fallback else 1.0,
        "normalization_rule_name": "nmt_nfkc",
        "max_sentences": MAX_TRAIN_SENTENCES,
        "version": SETTINGS_VERSION,
    }


def sample_training_text(
    pairs: Sequence[tuple[str, str]], max_sentences: int = MAX_TRAIN_SENTENCES, seed: int = 0
) -> list[str]:
    """Source and target sentences of at most ``max_sentences // 2`` pairs, sampled with a fixed seed."""
    n_pairs = max(1, max_sentences // 2)
    if len(pairs) > n_pairs:
        chosen = sorted(random.Random(seed).sample(range(len(pairs)), n_pairs))
        pairs = [pairs[i] for i in chosen]
    return [s for s, _ in pairs if s] + [t for _, t in pairs if t]


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, *, num_threads: int | None = None, source: str = "the corpus"
) -> Tokenizer:
    """Train a BPE vocabulary on ``texts`` (already sampled; both languages).

    A corpus too small for ``vocab_size`` pieces does not fail: sentencepiece stops when no merge is left
    (``hard_vocab_limit=False``) and we log the size we got.
    """
    if not texts:
        raise ValueError("cannot train a tokenizer: the training text is empty")
    settings = tokenizer_settings(vocab_size)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=writer,
        model_type=settings["model_type"],
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=settings["character_coverage"],
        byte_fallback=settings["byte_fallback"],
        normalization_rule_name=settings["normalization_rule_name"],
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        input_sentence_size=0,  # already sampled, deterministically
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        num_threads=num_threads or min(os.cpu_count() or 1, 8),
        minloglevel=2,  # sentencepiece logs every step to stderr otherwise
    )
    tok = Tokenizer(writer.getvalue())
    if tok.vocab_size < vocab_size:
        log.warning(
            "BPE vocabulary has %d pieces, fewer than data.vocab_size=%d: the training text of %s "
            "(%d sentences) has no more merges to make",
            tok.vocab_size,
            vocab_size,
            source,
            len(texts),
        )
    return tok


def cache_key(corpus_key: str, vocab_size: int) -> str:
    """Folder name of a cached vocabulary: readable size plus a hash of the corpus and the settings."""
    blob = json.dumps({"corpus": corpus_key, **tokenizer_settings(vocab_size)}, sort_keys=True)
    return f"bpe{vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def content_key(pairs: Sequence[tuple[str, str]]) -> str:
    """A key from the text itself, for corpora that did not come from ``corpora.load_corpus``."""
    h = hashlib.sha256()
    for src, tgt in pairs:
        h.update(src.encode())
        h.update(b"\t")
        h.update(tgt.encode())
        h.update(b"\n")
    return f"content-{h.hexdigest()[:24]}"


def cache_path(cfg: DataConfig, key: str) -> Path:
    """Where the vocabulary of the corpus ``key`` and ``cfg.vocab_size`` is cached (it may not exist yet)."""
    return Path(cfg.cache_dir) / "tokenizers" / cache_key(key, cfg.vocab_size) / MODEL_FILE


def load_or_train_tokenizer(cfg: DataConfig, corpus: Corpus, *, key: str | None = None) -> Tokenizer:
    """The cached vocabulary for this corpus and ``cfg.vocab_size``; trained (and cached) if missing.

    Args:
        cfg: data settings (``vocab_size``, ``cache_dir``).
        corpus: the corpus; its training pairs are the training text.
        key: what identifies the corpus; default ``corpora.corpus_key(cfg)``.
    """
    if key is None:
        from transformer_lit.corpora import corpus_key

        key = corpus_key(cfg)
    path = cache_path(cfg, key)
    if path.is_file():
        log.info("using cached tokenizer %s", path)
        return Tokenizer.load(path)
    texts = sample_training_text(corpus.train)
    log.info("training a %d-piece BPE vocabulary on %d sentences -> %s", cfg.vocab_size, len(texts), path)
    tok = train_tokenizer(texts, cfg.vocab_size, source=corpus.name)
    tok.save(path)
    info = {"corpus_key": key, "vocab_size": tok.vocab_size, **tokenizer_settings(cfg.vocab_size)}
    write_atomic(path.parent / "info.json", json.dumps(info, indent=1))
    return tok
