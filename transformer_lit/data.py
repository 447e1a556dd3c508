"""From sentence pairs to batches: encoding, length filtering and the Lightning DataModule.

Sequence layout (shared with the model and decoding): ``src`` = ids + [EOS], ``tgt_in`` = [BOS] + ids,
``tgt_out`` = ids + [EOS], each right-padded with PAD; batches are dicts
``{"src": (b, s), "tgt_in": (b, t), "tgt_out": (b, t), "index": (b,)}`` of int64 tensors, ``index`` being
each pair's position in its split so that dev hypotheses can be matched to their references.

Lengths below are the lengths as fed to the model, ids + 1 (EOS or BOS). ``data.max_len`` drops training
pairs whose source or target sequence would be longer than ``max_len`` positions; dev and test pairs are
never dropped (over-long ones are counted in the log and kept as they are), so scores always cover the
whole split. Batching itself (token buckets, epochs, sharding, resumption) lives in ``batching.py``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from transformer_lit.batching import (
    EncodedPairs,
    ResumableDataLoader,
    TokenBucketBatchSampler,
    identity_collate,
)
from transformer_lit.config import DataConfig
from transformer_lit.corpora import Corpus, load_corpus
from transformer_lit.tokenizer import Tokenizer, content_key, load_or_train_tokenizer

log = logging.getLogger(__name__)

ENCODE_CHUNK = 100_000
"""Sentences encoded per call: bounds the transient Python lists when encoding WMT14-sized corpora."""


def _encode_side(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 ids and int64 offsets (n + 1) of ``texts`` (no specials)."""
    ids_parts: list[np.ndarray] = []
    lens_parts: list[np.ndarray] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        encoded = tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK])
        lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lens.sum()))
        ids_parts.append(flat)
        lens_parts.append(lens)
    lens = np.concatenate(lens_parts) if lens_parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    return ids, offsets


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> EncodedPairs:
    """Encode every pair once; ``index`` is the pair's position in ``pairs``."""
    src_ids, src_offsets = _encode_side(tokenizer, [s for s, _ in pairs])
    tgt_ids, tgt_offsets = _encode_side(tokenizer, [t for _, t in pairs])
    return EncodedPairs(
        src_ids, src_offsets, tgt_ids, tgt_offsets, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )  # fmt: skip


def filter_by_length(data: EncodedPairs, max_len: int) -> tuple[EncodedPairs, int]:
    """Drop pairs whose source or target sequence (with EOS/BOS) exceeds ``max_len``; (kept, dropped)."""
    keep = (data.src_lens <= max_len) & (data.tgt_lens <= max_len)
    dropped = int(len(keep) - keep.sum())
    return (data if dropped == 0 else data.select(keep)), dropped


class TranslationDataModule(L.LightningDataModule):
    """Corpus, shared BPE vocabulary and token-bucketed batches for one run.

    Args:
        cfg: data settings (corpus, vocabulary size, ``max_tokens``, ``max_len``, cache folder, workers).
        seed: the run's seed; the training batch sequence is a function of it (and of the epoch).
        tokenizer_path: a saved ``tokenizer.model`` to use instead of the cached/trained one (a resumed run
            or an evaluation must decode with the vocabulary it was trained with).
        corpus: sentence pairs to use instead of ``load_corpus(cfg)`` (tests, benchmarks, notebooks); its
            vocabulary is cached under a hash of its training text.
        shard_eval: give each rank a disjoint share of the dev/test batches (the LightningModule must then
            sum its metrics across ranks); by default every rank sees the whole split.

    ``setup`` is idempotent and may be called before ``Trainer.fit`` (to learn the vocabulary size and build
    the model). The Trainer must be created with ``use_distributed_sampler=False``: the training batch
    sampler shards by rank itself, reading ``trainer.global_rank`` and ``trainer.world_size``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int = 0,
        tokenizer_path: str | Path | None = None,
        corpus: Corpus | None = None,
        shard_eval: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.tokenizer_path = tokenizer_path
        self.shard_eval = shard_eval
        self._corpus = corpus
        self._tokenizer: Tokenizer | None = None
        self.train_data: EncodedPairs | None = None
        self.dev_data: EncodedPairs | None = None
        self.test_data: EncodedPairs | None = None
        self.num_dropped = 0
        """Training pairs dropped by ``max_len``."""
        self.num_long_eval: dict[str, int] = {}
        """Dev/test pairs longer than ``max_len``, kept."""

    # -- set-up ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Train and cache the vocabulary once per node before the ranks set up (they then load it)."""
        if self.tokenizer_path is None and self._tokenizer is None:
            self._tokenizer = self._load_or_train_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        started = time.perf_counter()
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = Tokenizer.load(self.tokenizer_path)
            else:
                self._tokenizer = self._load_or_train_tokenizer()
        corpus = self.corpus
        encoded = encode_pairs(self._tokenizer, corpus.train)
        train, self.num_dropped = filter_by_length(encoded, self.cfg.max_len)
        self.train_data = train
        if self.num_dropped:
            log.info(
                "dropped %d of %d training pairs longer than data.max_len=%d tokens (with EOS/BOS) on a side",
                self.num_dropped,
                len(corpus.train),
                self.cfg.max_len,
            )
        if len(train) == 0:
            raise ValueError(
                f"data.max_len={self.cfg.max_len} drops all {len(corpus.train)} training pairs; "
                "raise data.max_len"
            )
        self.dev_data = encode_pairs(self._tokenizer, corpus.dev)
        self.test_data = encode_pairs(self._tokenizer, corpus.test)
        for name, data in (("dev", self.dev_data), ("test", self.test_data)):
            _, long = filter_by_length(data, self.cfg.max_len)
            self.num_long_eval[name] = long
            if long:
                log.info("%d %s pairs are longer than data.max_len=%d; kept", long, name, self.cfg.max_len)
        if self.cfg.max_len > self.cfg.max_tokens:
            log.warning(
                "data.max_len=%d > data.max_tokens=%d: a pair that long gets a batch of its own, over budget",
                self.cfg.max_len,
                self.cfg.max_tokens,
            )
        log.info(
            "data ready in %.1f s: %d train / %d dev / %d test pairs, vocabulary %d",
            time.perf_counter() - started,
            len(train),
            len(self.dev_data),
            len(self.test_data),
            self._tokenizer.vocab_size,
        )

    def _load_or_train_tokenizer(self) -> Tokenizer:
        if self._corpus is not None:  # given in memory: key the cache by its text
            return load_or_train_tokenizer(self.cfg, self._corpus, key=content_key(self._corpus.train))
        return load_or_train_tokenizer(self.cfg, self.corpus)

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.cfg)
        return self._corpus

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("TranslationDataModule.setup() must run before the tokenizer is used")
        return self._tokenizer

    @property
    def dev_pairs(self) -> list[tuple[str, str]]:
        """Raw (source, reference) strings of the dev split; ``batch["index"]`` points into this list."""
        return self.corpus.dev

    @property
    def test_pairs(self) -> list[tuple[str, str]]:
        return self.corpus.test

    def save_tokenizer(self, path: str | Path) -> None:
        """Copy the vocabulary into a run folder (``RUN/checkpoints/tokenizer.model``)."""
        self.tokenizer.save(path)

    # -- loaders -----------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        world = int(trainer.world_size)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "Trainer(use_distributed_sampler=True) with TranslationDataModule: create the Trainer with "
                "use_distributed_sampler=False, the batch sampler shards by rank itself"
            )
        return int(trainer.global_rank), world

    def _loader_kwargs(self) -> dict[str, Any]:
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        workers = self.cfg.num_workers
        return {
            "collate_fn": identity_collate,
            "num_workers": workers,
            "pin_memory": on_gpu,
            "persistent_workers": workers > 0,
        }

    def _sampler(self, data: EncodedPairs | None, *, shuffle: bool, shard: bool) -> TokenBucketBatchSampler:
        if data is None:
            raise RuntimeError("TranslationDataModule.setup() must run before its dataloaders are requested")
        rank, world = self._rank_world() if shard else (0, 1)
        return TokenBucketBatchSampler(
            data.src_lens, data.tgt_lens, self.cfg.max_tokens, shuffle=shuffle, seed=self.seed, rank=rank,
            world_size=world,
        )  # fmt: skip

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled token buckets for this rank; resumable mid-epoch from Lightning checkpoints."""
        sampler = self._sampler(self.train_data, shuffle=True, shard=True)
        return ResumableDataLoader(self.train_data, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The dev split in length order (``index`` maps batches back to ``dev_pairs``)."""
        sampler = self._sampler(self.dev_data, shuffle=False, shard=self.shard_eval)
        return DataLoader(self.dev_data, batch_sampler=sampler, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.test_data, shuffle=False, shard=self.shard_eval)
        return DataLoader(self.test_data, batch_sampler=sampler, **self._loader_kwargs())
