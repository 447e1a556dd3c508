"""From sentence pairs to batches: the prepared data, mapped, and the Lightning DataModule.

Sequence layout (shared with the model and decoding): ``src`` = ids + [EOS], ``tgt_in`` = [BOS] + ids,
``tgt_out`` = ids + [EOS], each right-padded with PAD; batches are dicts
``{"src": (b, s), "tgt_in": (b, t), "tgt_out": (b, t), "index": (b,)}`` of int64 tensors, ``index`` being
each pair's position in its split so that dev hypotheses can be matched to their references.

Lengths below are the lengths as fed to the model, ids + 1 (EOS or BOS). ``data.max_len`` drops training
pairs whose source or target sequence would be longer than ``max_len`` positions; dev and test pairs are
never dropped (over-long ones are counted in the log and kept as they are), so scores always cover the
whole split. The corpus is encoded once per corpus, vocabulary and ``max_len`` (``preparation.py``); every
run maps the result read-only (``prepared.py``). Batching itself (token buckets, epochs, sharding,
resumption) lives in ``batching.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from transformer_lit import prepared as P
from transformer_lit.batching import (
    EncodedPairs,
    ResumableDataLoader,
    TokenBucketBatchSampler,
    identity_collate,
)
from transformer_lit.buckets import BatchPlan
from transformer_lit.config import DataConfig
from transformer_lit.corpora import Corpus, load_corpus
from transformer_lit.preparation import encode_flat, ensure_plan, ensure_prepared, load_plan
from transformer_lit.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

log = logging.getLogger(__name__)


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> EncodedPairs:
    """Encode pairs in memory (tests, notebooks; runs map prepared data); ``index``: position in ``pairs``."""
    src_ids, src_lens = encode_flat(tokenizer, [s for s, _ in pairs], np.dtype(np.int32))
    tgt_ids, tgt_lens = encode_flat(tokenizer, [t for _, t in pairs], np.dtype(np.int32))
    return EncodedPairs(
        src_ids, _offsets(src_lens), tgt_ids, _offsets(tgt_lens), pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
    )  # fmt: skip


def _offsets(lens: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets


def filter_by_length(data: EncodedPairs, max_len: int) -> tuple[EncodedPairs, int]:
    """Drop pairs whose source or target sequence (with EOS/BOS) exceeds ``max_len``; (kept, dropped)."""
    keep = (data.src_lens <= max_len) & (data.tgt_lens <= max_len)
    dropped = int(len(keep) - keep.sum())
    return (data if dropped == 0 else data.select(keep)), dropped


class MappedPairs(EncodedPairs):
    """One split of a prepared folder, mapped read-only. DataLoader workers map the folder again rather
    than receive a pickled copy of its arrays."""

    def __init__(self, data: P.PreparedData, split: str) -> None:
        src_ids, src_offsets, src_counts = data.side(split, "src")
        tgt_ids, tgt_offsets, tgt_counts = data.side(split, "tgt")
        super().__init__(
            src_ids, src_offsets, tgt_ids, tgt_offsets, data.arrays[f"{split}.index"], src_counts=src_counts,
            tgt_counts=tgt_counts, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        )  # fmt: skip
        self.folder, self.split = data.folder, split

    def __reduce__(self) -> tuple[Any, ...]:
        return (_remap, (str(self.folder), self.split))


def _remap(folder: str, split: str) -> MappedPairs:
    return MappedPairs(P.map_prepared(folder), split)


class TranslationDataModule(L.LightningDataModule):
    """Corpus, shared BPE vocabulary and token-bucketed batches for one run.

    Args:
        cfg: data settings (corpus, vocabulary size, ``max_tokens``, ``max_len``, cache folder, workers).
        seed: the run's seed; the training batch sequence is a function of it (and of the epoch).
        tokenizer_path: a saved ``tokenizer.model`` to use instead of the cached/trained one (a resumed run
            or an evaluation must decode with the vocabulary it was trained with).
        corpus: sentence pairs to use instead of ``load_corpus(cfg)`` (tests, benchmarks, notebooks); its
            vocabulary is cached under a hash of its training text, its prepared data under a hash of all
            its text.
        shard_eval: give each rank a disjoint share of the dev/test batches (the LightningModule must then
            sum its metrics across ranks); by default every rank sees the whole split.

    ``setup`` is idempotent and may be called before ``Trainer.fit`` (to learn the vocabulary size and build
    the model). It maps the prepared data (``preparation.ensure_prepared``, which prepares it on first use)
    and reads the training buckets planned from the stored lengths (``preparation.load_plan``). The
    Trainer must be created with ``use_distributed_sampler=False``: the training batch sampler shards by
    rank itself, reading ``trainer.global_rank`` and ``trainer.world_size``.
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
        self._folder: Path | None = None
        self._started: float | None = None
        self._eval_pairs: dict[str, list[tuple[str, str]]] = {}
        self._train_lens: tuple[np.ndarray, np.ndarray] | None = None
        self._train_plan: BatchPlan | None = None
        self.train_data: EncodedPairs | None = None
        self.dev_data: EncodedPairs | None = None
        self.test_data: EncodedPairs | None = None
        self.num_dropped = 0
        """Training pairs dropped by ``max_len`` or ``clean_ratio``."""
        self.num_long_eval: dict[str, int] = {}
        """Dev/test pairs longer than ``max_len``, kept."""

    # -- set-up ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Prepare the data and its batch plan once per node (under a lock) before the ranks set up; they then
        map them."""
        if self._started is None:  # "data ready" counts a preparation made on first use
            self._started = time.perf_counter()
        if self._folder is None:
            self._folder = ensure_prepared(self.cfg, corpus=self._corpus, tokenizer_path=self.tokenizer_path)
            ensure_plan(self._folder, self.cfg.max_tokens)

    def setup(self, stage: str | None = None) -> None:
        """Map the prepared data (preparing it first if needed) and plan the training buckets."""
        if self.train_data is not None:
            return
        self.prepare_data()
        assert self._folder is not None
        data = P.map_prepared(self._folder)
        self._tokenizer = Tokenizer.load(self._folder / P.TOKENIZER)
        self.train_data, self.dev_data, self.test_data = (MappedPairs(data, s) for s in P.SPLITS)
        self._eval_pairs = {name: data.pairs(name) for name in ("dev", "test")}
        stats = data.index["splits"]
        train = stats["train"]
        self.num_dropped = train["dropped_max_len"] + train["dropped_ratio"]
        self.num_long_eval = {name: stats[name]["long"] for name in ("dev", "test")}
        if train["dropped_max_len"]:
            log.info(
                "dropped %d of %d training pairs longer than data.max_len=%d tokens (with EOS/BOS) on a side",
                train["dropped_max_len"], train["read"], self.cfg.max_len,
            )  # fmt: skip
        if train["dropped_ratio"]:
            log.info(
                "dropped %d of %d training pairs whose lengths differ by more than data.clean_ratio=%s",
                train["dropped_ratio"], train["read"], self.cfg.clean_ratio,
            )  # fmt: skip
        for name, long in self.num_long_eval.items():
            if long:
                log.info("%d %s pairs are longer than data.max_len=%d; kept", long, name, self.cfg.max_len)
        if self.cfg.max_len > self.cfg.max_tokens:
            log.warning(
                "data.max_len=%d > data.max_tokens=%d: a pair that long gets a batch of its own, over budget",
                self.cfg.max_len,
                self.cfg.max_tokens,
            )
        self._train_lens = (self.train_data.src_lens, self.train_data.tgt_lens)
        self._train_plan = load_plan(data, self.cfg.max_tokens)  # stored by prepare_data
        log.info(
            "data ready in %.1f s: %d train / %d dev / %d test pairs, vocabulary %d (mapped from %s)",
            time.perf_counter() - self._started,
            len(self.train_data),
            len(self.dev_data),
            len(self.test_data),
            self._tokenizer.vocab_size,
            self._folder,
        )

    @property
    def corpus(self) -> Corpus:
        """The sentence pairs as text (tests and notebooks; runs use the mapped data and ``dev_pairs``)."""
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
        return self._pairs("dev")

    @property
    def test_pairs(self) -> list[tuple[str, str]]:
        return self._pairs("test")

    def _pairs(self, split: str) -> list[tuple[str, str]]:
        if split not in self._eval_pairs:
            raise RuntimeError("TranslationDataModule.setup() must run before the dev/test pairs are used")
        return self._eval_pairs[split]

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

    def _sampler(
        self, data: EncodedPairs | None, *, shuffle: bool, shard: bool, train: bool = False
    ) -> TokenBucketBatchSampler:
        if data is None:
            raise RuntimeError("TranslationDataModule.setup() must run before its dataloaders are requested")
        rank, world = self._rank_world() if shard else (0, 1)
        lens = self._train_lens if train and self._train_lens else (data.src_lens, data.tgt_lens)
        return TokenBucketBatchSampler(
            *lens, self.cfg.max_tokens, shuffle=shuffle, seed=self.seed, rank=rank,
            world_size=world, plan=self._train_plan if train else None,
        )  # fmt: skip

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled token buckets for this rank; resumable mid-epoch from Lightning checkpoints."""
        sampler = self._sampler(self.train_data, shuffle=True, shard=True, train=True)
        return ResumableDataLoader(self.train_data, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The dev split in length order (``index`` maps batches back to ``dev_pairs``)."""
        sampler = self._sampler(self.dev_data, shuffle=False, shard=self.shard_eval)
        return DataLoader(self.dev_data, batch_sampler=sampler, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.test_data, shuffle=False, shard=self.shard_eval)
        return DataLoader(self.test_data, batch_sampler=sampler, **self._loader_kwargs())
