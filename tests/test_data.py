"""Token-bucket batching, collation, length filtering and the DataModule (also under a real Lightning fit)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_lit.batching import (
    EncodedPairs,
    ResumableDataLoader,
    TokenBucketBatchSampler,
    identity_collate,
)
from transformer_lit.buckets import BatchPlan, plan_batches
from transformer_lit.config import DataConfig
from transformer_lit.corpora import Corpus
from transformer_lit.data import MappedPairs, TranslationDataModule, encode_pairs, filter_by_length
from transformer_lit.tokenizer import BOS_ID, EOS_ID, PAD_ID

WORDS_EN = "the a cat dog house river sees likes quickly old small green and under".split()  # noqa: SIM905
WORDS_DE = "der die katze hund haus fluss sieht mag schnell alt klein grün und unter".split()  # noqa: SIM905


def stand_in_corpus(n: int = 600, seed: int = 0) -> Corpus:
    """Random word strings, target about as long as the source: enough to exercise every code path."""
    rng = random.Random(seed)

    def pair(lo: int, hi: int) -> tuple[str, str]:
        k = rng.randint(lo, hi)
        src = " ".join(rng.choice(WORDS_EN) for _ in range(k))
        tgt = " ".join(rng.choice(WORDS_DE) for _ in range(max(1, k + rng.randint(-2, 3))))
        return src, tgt

    train = [pair(1, 30) for _ in range(n)]
    return Corpus(train, [pair(1, 30) for _ in range(60)], [pair(20, 60) for _ in range(40)], "stand-in")


def random_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 80, n)
    tgt = np.clip(src + rng.integers(-6, 7, n), 2, None)
    return src, tgt


def epoch_indices(sampler: TokenBucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


# -- the batch plan and the sampler ------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [200, 1000, 4096])
def test_batches_respect_max_tokens_on_both_sides(max_tokens: int) -> None:
    src, tgt = random_lengths(3000)
    sampler = TokenBucketBatchSampler(src, tgt, max_tokens, seed=1)
    for batch in epoch_indices(sampler, 0) + epoch_indices(sampler, 3):
        assert len(batch) * src[batch].max() <= max_tokens
        assert len(batch) * tgt[batch].max() <= max_tokens
    filled = [len(b) * max(src[b].max(), tgt[b].max()) / max_tokens for b in epoch_indices(sampler, 0)]
    assert np.mean(filled) > 0.75  # batches hold about max_tokens, not a fraction of it


def test_every_pair_exactly_once_per_epoch_and_count_fixed() -> None:
    src, tgt = random_lengths(2500, seed=3)
    sampler = TokenBucketBatchSampler(src, tgt, 1024, seed=0)
    for epoch in range(3):
        batches = epoch_indices(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(2500))


def test_padding_is_low_on_both_sides() -> None:
    src, tgt = random_lengths(20000, seed=4)
    batches = plan_batches(src, tgt, 4096)
    real = src.sum() + tgt.sum()
    padded = sum(len(b) * (src[b].max() + tgt[b].max()) for b in batches)
    assert real / padded > 0.93


def test_same_seed_same_batches_new_epoch_new_order() -> None:
    src, tgt = random_lengths(2000, seed=5)
    a = TokenBucketBatchSampler(src, tgt, 1000, seed=7)
    b = TokenBucketBatchSampler(src, tgt, 1000, seed=7)
    c = TokenBucketBatchSampler(src, tgt, 1000, seed=8)
    assert epoch_indices(a, 0) == epoch_indices(b, 0)
    assert epoch_indices(a, 1) == epoch_indices(b, 1)
    assert epoch_indices(a, 0) != epoch_indices(a, 1)
    assert epoch_indices(a, 0) != epoch_indices(c, 0)
    # batch members change too, not only the order (pairs of equal lengths swap)
    members = {frozenset(x) for x in epoch_indices(a, 0)}
    assert members != {frozenset(x) for x in epoch_indices(a, 1)}


def test_unshuffled_sampler_is_stable() -> None:
    src, tgt = random_lengths(500, seed=6)
    s = TokenBucketBatchSampler(src, tgt, 800, shuffle=False)
    assert epoch_indices(s, 0) == epoch_indices(s, 5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_covering_the_data(world_size: int) -> None:
    src, tgt = random_lengths(1999, seed=2)
    ranks = range(world_size)
    samplers = [TokenBucketBatchSampler(src, tgt, 700, seed=3, rank=r, world_size=world_size) for r in ranks]
    for epoch in (0, 1):
        per_rank = [epoch_indices(s, epoch) for s in samplers]
        # equal steps on every rank, or DDP hangs
        assert len({len(p) for p in per_rank}) == 1 == len({len(s) for s in samplers})
        seen = [i for p in per_rank for b in p for i in b]
        assert sorted(seen) == list(range(1999))  # disjoint and complete: nothing dropped or repeated


def test_balance_splits_largest_batches() -> None:
    plan = BatchPlan.from_batches([np.arange(0, 10), np.arange(10, 13), np.arange(13, 20)])
    out = plan.balanced(2)
    assert [b.tolist() for b in out] == [
        list(range(5)),
        list(range(5, 10)),
        [10, 11, 12],
        list(range(13, 20)),
    ]
    assert plan.balanced(1) is plan and len(plan.balanced(3)) == 3
    singles = BatchPlan.from_batches([np.arange(1), np.arange(1, 2), np.arange(2, 3)])
    assert len(singles.balanced(2)) == 3  # nothing left to split: the sampler repeats a batch instead


def test_the_batch_sequence_is_pinned() -> None:
    """Every batch of every rank and epoch, hashed: a change to planning, shuffling or sharding that moves any
    pair fails here, because it changes every run's training and no shipped table would reproduce."""
    import hashlib

    rng = np.random.default_rng(5)
    src = rng.integers(2, 60, 3001)
    tgt = np.clip(src + rng.integers(-5, 6, 3001), 2, None)
    digest = hashlib.sha256()
    for world, shuffle in [(1, True), (1, False), (2, True), (3, True)]:
        for rank in range(world):
            sampler = TokenBucketBatchSampler(
                src, tgt, 700, shuffle=shuffle, seed=7, rank=rank, world_size=world
            )
            for epoch in (0, 1, 2):
                for batch in epoch_indices(sampler, epoch):
                    digest.update(np.asarray(batch, dtype=np.int64).tobytes() + b"|")
    assert digest.hexdigest() == "e5e1f3fe44a8ce5561d8b39be3c0975f908a2cac17909d59d5827dd643d1da79"


def test_resume_mid_epoch_continues_the_same_sequence() -> None:
    src, tgt = random_lengths(1500, seed=9)
    full = TokenBucketBatchSampler(src, tgt, 900, seed=4)
    expected = epoch_indices(full, 2)
    resumed = TokenBucketBatchSampler(src, tgt, 900, seed=4)
    resumed.resume(epoch=2, batches_done=5)
    resumed.set_epoch(2)  # what Lightning does next
    assert list(resumed) == expected[5:]
    assert list(resumed) == expected  # the skip applies once
    other = TokenBucketBatchSampler(src, tgt, 900, seed=4)
    other.resume(epoch=2, batches_done=len(expected))  # saved at the epoch's last batch...
    other.set_epoch(3)  # ...and Lightning moved on: the next epoch is whole
    assert list(other) == epoch_indices(full, 3)


def test_dataloader_state_dict_round_trip() -> None:
    data = encoded_stand_in()

    def make_loader(seed: int) -> ResumableDataLoader:
        sampler = TokenBucketBatchSampler(data.src_lens, data.tgt_lens, 300, seed=seed)
        return ResumableDataLoader(data, batch_sampler=sampler, collate_fn=identity_collate)

    loader = make_loader(1)
    loader.batch_sampler.set_epoch(1)
    all_batches = [b["index"].tolist() for b in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 3
    fresh = make_loader(1)
    fresh.load_state_dict(state)
    assert [b["index"].tolist() for b in fresh] == all_batches[3:]
    mismatched = make_loader(2)
    mismatched.load_state_dict(state)  # another seed: the epoch restarts whole rather than skip wrong batches
    assert len(list(mismatched)) == len(mismatched)


# -- encoding, collation, filtering ------------------------------------------------------------------------
def encoded_stand_in(n: int = 300) -> EncodedPairs:
    from transformer_lit.tokenizer import sample_training_text, train_tokenizer

    corpus = stand_in_corpus(n)
    tok = train_tokenizer(sample_training_text(corpus.train), 120)
    return encode_pairs(tok, corpus.train)


def test_collate_layout() -> None:
    rows = [[5, 6, 7], [8], []]
    tgts = [[9, 10], [11, 12, 13, 14], [15]]
    flat = lambda seqs: np.array([i for s in seqs for i in s], dtype=np.int32)  # noqa: E731
    offsets = lambda seqs: np.cumsum([0] + [len(s) for s in seqs])  # noqa: E731
    data = EncodedPairs(flat(rows), offsets(rows), flat(tgts), offsets(tgts), index=np.array([10, 11, 12]))
    batch = data.__getitems__([1, 0, 2])
    P, B, E = PAD_ID, BOS_ID, EOS_ID
    assert batch["src"].tolist() == [[8, E, P, P], [5, 6, 7, E], [E, P, P, P]]
    assert batch["tgt_in"].tolist() == [[B, 11, 12, 13, 14], [B, 9, 10, P, P], [B, 15, P, P, P]]
    assert batch["tgt_out"].tolist() == [[11, 12, 13, 14, E], [9, 10, E, P, P], [15, E, P, P, P]]
    assert batch["index"].tolist() == [11, 10, 12]
    assert all(t.dtype == torch.int64 for t in batch.values())
    np.testing.assert_array_equal(data.src_lens, [4, 2, 1])


def test_max_len_filter_counts_and_keeps_positions() -> None:
    data = encoded_stand_in()
    max_len = int(np.median(data.src_lens))
    kept, dropped = filter_by_length(data, max_len)
    too_long = (data.src_lens > max_len) | (data.tgt_lens > max_len)
    assert dropped == int(too_long.sum()) > 0 and len(kept) == len(data) - dropped
    assert kept.src_lens.max() <= max_len and kept.tgt_lens.max() <= max_len
    np.testing.assert_array_equal(kept.index, np.flatnonzero(~too_long))
    batch = kept.__getitems__([0, 1])
    full = data.__getitems__(kept.index[:2].tolist())
    assert torch.equal(batch["src"], full["src"]) and torch.equal(batch["index"], full["index"])


# -- the DataModule ----------------------------------------------------------------------------------------
def check_module(dm: TranslationDataModule, cfg: DataConfig) -> None:
    dm.setup("fit")
    tok = dm.tokenizer
    assert tok.vocab_size <= cfg.vocab_size
    n_train = len(dm.corpus.train)
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"src", "tgt_in", "tgt_out", "index"}
        for side in ("src", "tgt_out"):
            assert batch[side].numel() <= cfg.max_tokens
        assert batch["src"].shape[1] <= cfg.max_len and batch["tgt_in"].shape[1] <= cfg.max_len
        assert (batch["tgt_in"][:, 0] == BOS_ID).all()
        seen += batch["index"].tolist()
    assert len(seen) == len(set(seen)) == n_train - dm.num_dropped
    first = batch["index"][0].item()
    assert tok.decode(batch["tgt_out"][0]) == " ".join(dm.corpus.train[first][1].split())
    dev = [i for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert sorted(dev) == list(range(len(dm.dev_pairs)))  # nothing dropped from dev
    test = [i for b in dm.test_dataloader() for i in b["index"].tolist()]
    assert sorted(test) == list(range(len(dm.test_pairs)))


def test_datamodule_on_a_stand_in_corpus(tmp_path: Path) -> None:
    cfg = DataConfig(vocab_size=150, max_tokens=600, max_len=24, cache_dir=str(tmp_path))
    dm = TranslationDataModule(cfg, seed=3, corpus=stand_in_corpus())
    check_module(dm, cfg)
    assert dm.num_dropped > 0 and dm.num_long_eval["test"] > 0  # long test pairs are counted, and kept
    dm.save_tokenizer(tmp_path / "run" / "tokenizer.model")
    saved = tmp_path / "run" / "tokenizer.model"
    again = TranslationDataModule(cfg, seed=3, corpus=stand_in_corpus(), tokenizer_path=saved)
    again.setup()
    assert again.tokenizer.vocab_size == dm.tokenizer.vocab_size
    assert [b["index"].tolist() for b in again.train_dataloader()] == [
        b["index"].tolist() for b in dm.train_dataloader()
    ]


def test_datamodule_on_the_synthetic_corpus(tmp_path: Path) -> None:
    cfg = DataConfig(synthetic_pairs=2000, vocab_size=500, max_tokens=2000, cache_dir=str(tmp_path))
    dm = TranslationDataModule(cfg, seed=0)
    check_module(dm, cfg)
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.model"))) == 1
    # the demo's corpus takes the users' path: prepared once on disk, then mapped
    assert isinstance(dm.train_data, MappedPairs) and isinstance(dm.dev_data, MappedPairs)
    prepared = [p.parent for p in (tmp_path / "prepared").glob("synthetic-*/index.json")]
    assert prepared == [dm.train_data.folder]


def test_datamodule_needs_setup() -> None:
    dm = TranslationDataModule(DataConfig(), corpus=stand_in_corpus(10))
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.tokenizer


# -- under a real Lightning fit: epochs advance, and a mid-epoch resume continues the same batch sequence --
def fit_and_record(
    dm: TranslationDataModule, root: Path, steps: int, *, ckpt: Path | None = None, every: int | None = None
) -> list[list[int]]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.ddp_data_worker import Recorder

    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
        limit_val_batches=0, use_distributed_sampler=False, default_root_dir=root,
    )  # fmt: skip
    module = Recorder()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_epochs_and_mid_epoch_resume(tmp_path: Path) -> None:
    cfg = DataConfig(vocab_size=120, max_tokens=500, max_len=64, cache_dir=str(tmp_path))
    corpus = stand_in_corpus(150)
    dm = TranslationDataModule(cfg, seed=5, corpus=corpus)
    dm.setup()
    per_epoch = len(dm.train_dataloader())
    assert per_epoch >= 4
    total = 2 * per_epoch + 3  # into the third epoch
    stop = per_epoch + 2  # a checkpoint in the middle of the second epoch

    straight = fit_and_record(dm, tmp_path / "a", total, every=stop)
    # Lightning advanced the epoch through set_epoch: the steps are exactly the sampler's epochs 0, 1, 2
    sampler = dm.train_dataloader().batch_sampler
    expected = [b for epoch in range(3) for b in epoch_indices(sampler, epoch)][:total]
    assert straight == expected

    ckpt = next((tmp_path / "a").glob(f"*step={stop}.ckpt"))
    fresh = TranslationDataModule(cfg, seed=5, corpus=corpus)
    resumed = fit_and_record(fresh, tmp_path / "b", total, ckpt=ckpt)
    assert resumed == straight[stop:]


@pytest.mark.slow
def test_two_gloo_ddp_ranks_share_the_mapped_data_and_split_its_batches(tmp_path: Path) -> None:
    """2 real processes (Lightning's ddp strategy, gloo) train one epoch of the real DataModule: both map
    the one prepared folder, and their batches are disjoint, equal in number and cover every training pair."""
    from transformer_lit import prepared as P

    worker = Path(__file__).with_name("ddp_data_worker.py")
    root = worker.parents[1]
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    folders = list((tmp_path / "cache" / "prepared").glob("*/index.json"))
    assert len(folders) == 1 and {r["folder"] for r in ranks} == {str(folders[0].parent)}
    assert {r["class"] for r in ranks} == {"MappedPairs"}
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 1  # equal steps, or DDP hangs
    seen = [[i for b in r["batches"] for i in b] for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    kept = P.map_prepared(folders[0].parent).arrays["train.index"]
    assert sorted(seen[0] + seen[1]) == kept.tolist()  # every kept pair once, none twice
