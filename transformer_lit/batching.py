"""Token-bucket batching: batches of similar-length pairs holding about ``max_tokens`` tokens per side.

The paper (Section 5.1): "Sentence pairs were batched together by approximate sequence length. Each
training batch contained a set of sentence pairs containing approximately 25000 source tokens and 25000
target tokens." Here a batch of ``b`` pairs whose longest source has ``s`` tokens and longest target ``t``
tokens satisfies ``b * s <= max_tokens`` and ``b * t <= max_tokens``: the padded tensors, not just the real
tokens, fit the budget, so memory per step is bounded. (A single pair longer than ``max_tokens`` still gets
a batch of its own; training filters such pairs by ``max_len`` first.)

How batches are formed, and why the number of batches never changes between epochs:
1. Once, at construction (or read from the prepared data, ``preparation.load_plan``),
   ``buckets.plan_batches`` groups positions of the length-sorted order into batches whose source lengths
   and target lengths are both close (a k-d split of the length plane, see there).
2. Each epoch, pairs with identical (source, target) lengths swap places at random (a random tie-break
   in the sort), so batch members change from epoch to epoch while the lengths at every position, hence
   the plan and the batch count, stay the same: Lightning fixes the epoch length at set-up, and DDP
   ranks must agree on it.
3. The batch order is shuffled with a generator seeded by ``(seed, epoch)``: the same seed gives the same
   batch sequence, which exact resumption needs.

Sharding (distributed training): rank ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...`` of the
epoch's shuffled list. All ranks must run the same number of steps or DDP hangs, so at construction the
largest batches are split in two until the count is a multiple of ``W``. Nothing is dropped or repeated:
the ranks' batches are disjoint and together hold every pair exactly once per epoch. (Only if no batch has
two pairs left to split, a few batches are repeated, with a warning.)

Epochs and resumption: Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on
the batch sampler itself; see ``lightning.fabric.utilities.data._set_sampler_epoch``), with the fit loop's
epoch counter, before each training epoch; ``sampler`` is therefore the batch sampler itself.
``ResumableDataLoader`` implements ``state_dict``/``load_state_dict``, which Lightning stores in every
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives back before the resumed run creates
its iterator. The state is (epoch, batches already returned in it); the resumed run skips those batches
and goes on with the next one of the same epoch, so a run killed mid-epoch sees exactly the batch
sequence of an uninterrupted run (same seed, same world size).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transformer_lit.buckets import BatchPlan, lens_as_fed, plan_for

log = logging.getLogger(__name__)


class TokenBucketBatchSampler(Sampler[list[int]]):
    """Yields lists of pair indices (one list per batch) for this rank, reshuffled every epoch.

    Args:
        src_lens: length of each source sequence as fed to the model (ids + EOS).
        tgt_lens: length of each decoder sequence (BOS + ids, or ids + EOS: the same).
        max_tokens: budget per side, padding included.
        shuffle: new batch members and order each epoch; otherwise batches in length order.
        seed: the run's seed; an epoch's order is a function of (seed, epoch).
        rank, world_size: this process's shard.
        plan: ``plan_for(src_lens, tgt_lens, max_tokens)`` if already computed.
    """

    def __init__(
        self,
        src_lens: np.ndarray | list[int],
        tgt_lens: np.ndarray | list[int],
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        plan: BatchPlan | None = None,
    ) -> None:
        # Lengths only order the pairs (sort keys), so they keep the dtype they come in: no int64 copies
        # of a WMT-sized split in every run.
        self.src_lens = np.asarray(src_lens)
        self.tgt_lens = np.asarray(tgt_lens)
        if self.src_lens.shape != self.tgt_lens.shape or self.src_lens.ndim != 1:
            raise ValueError(
                f"src_lens and tgt_lens must be 1-d and equal in length, got {self.src_lens.shape}"
            )
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.sampler = self  # Lightning calls set_epoch on batch_sampler.sampler
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint
        self.iter_epoch = 0  # epoch and first batch of the iteration in progress (for ResumableDataLoader)
        self.iter_start = 0

        # Batches are planned once on the length-sorted order; an epoch only permutes pairs of identical
        # (source, target) lengths, so every position keeps its lengths and every batch stays valid.
        self._keys = (self.tgt_lens, self.src_lens)  # lexsort: last key is primary
        plan = plan_for(self.src_lens, self.tgt_lens, max_tokens) if plan is None else plan
        self._plan = plan.balanced(world_size)  # positions into the epoch's sorted order
        self._num_local = -(-len(self._plan) // world_size)  # ceil: repeats fill the rest if unbalanced
        if len(self._plan) % world_size:
            log.warning(
                "%d batches cannot be split evenly over %d ranks; %d batches are repeated each epoch",
                len(self._plan),
                world_size,
                self._num_local * world_size - len(self._plan),
            )

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each training epoch (the fit loop's epoch counter)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration start at batch ``batches_done`` of ``epoch`` (from a checkpoint)."""
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(batches_done))

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All ranks' batches of ``epoch``: (order, batch ids). Batch ``j`` of the epoch, dealt out in turn
        (rank r takes r, r + W, ...), is ``order[plan[batch_ids[j]]]``, where ``order`` is the epoch's
        length-sorted order of the pairs."""
        n = len(self.src_lens)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.lexsort((rng.random(n), *self._keys))
            batch_ids = rng.permutation(len(self._plan))
        else:
            order = np.lexsort((np.arange(n), *self._keys))
            batch_ids = np.arange(len(self._plan))
        missing = self._num_local * self.world_size - len(batch_ids)
        return order, np.concatenate([batch_ids, batch_ids[:missing]])

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        start = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = min(self._resume[1], self._num_local)
                log.info("resuming epoch %d at batch %d of %d", epoch, start, self._num_local)
            self._resume = None
        self.iter_epoch, self.iter_start = epoch, start
        order, batch_ids = self.epoch_batches(epoch)
        for b in batch_ids[self.rank :: self.world_size][start:]:
            yield order[self._plan[b]].tolist()

    def __len__(self) -> int:
        """Batches of this rank per epoch (the full epoch, also when a resumed iteration skips some)."""
        return self._num_local


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``TokenBucketBatchSampler`` that Lightning checkpoints mid-epoch.

    Lightning saves ``state_dict()`` of every training loader that has one and calls ``load_state_dict``
    before building the resumed run's iterator. Batches are counted as they are returned, not as the
    sampler yields them, because worker processes draw indices ahead of the training loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, TokenBucketBatchSampler):
            raise TypeError("ResumableDataLoader needs batch_sampler=TokenBucketBatchSampler(...)")
        self._returned = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._returned = 0
        for batch in super().__iter__():
            self._returned += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        s: TokenBucketBatchSampler = self.batch_sampler  # type: ignore[assignment]
        return {
            "epoch": s.iter_epoch,
            "batches_done": s.iter_start + self._returned,
            "num_batches": len(s),
            "world_size": s.world_size,
            "seed": s.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s: TokenBucketBatchSampler = self.batch_sampler  # type: ignore[assignment]
        saved = (state.get("num_batches"), state.get("world_size"), state.get("seed"))
        if saved != (len(s), s.world_size, s.seed):
            log.warning(
                "checkpoint's batching (batches per epoch, world size, seed) %s differs from this run's %s; "
                "epoch %s restarts from its first batch",
                saved,
                (len(s), s.world_size, s.seed),
                state.get("epoch"),
            )
            s.set_epoch(state.get("epoch", 0))
            return
        s.resume(state["epoch"], state["batches_done"])


class EncodedPairs(Dataset):
    """Encoded sentence pairs as flat id arrays (ids without specials), the Dataset of every loader.

    Flat arrays plus offsets keep WMT14-sized data (4.5M pairs, ~270M ids) in about a gigabyte where
    Python lists of ints would need tens. ``__getitems__`` builds a whole padded batch with vectorised
    numpy, which is what keeps loading far faster than any model consumes it.

    Attributes:
        index: (n,) position of each pair in its split (``batch["index"]``); filtering keeps positions.
    """

    def __init__(
        self,
        src_ids: np.ndarray,
        src_offsets: np.ndarray,
        tgt_ids: np.ndarray,
        tgt_offsets: np.ndarray,
        index: np.ndarray | None = None,
        *,
        src_counts: np.ndarray | None = None,
        tgt_counts: np.ndarray | None = None,
        pad_id: int = 0,
        bos_id: int = 2,
        eos_id: int = 3,
    ) -> None:
        self.src_ids, self.src_offsets = np.asarray(src_ids), np.asarray(src_offsets, dtype=np.int64)
        self.tgt_ids, self.tgt_offsets = np.asarray(tgt_ids), np.asarray(tgt_offsets, dtype=np.int64)
        n = len(self.src_offsets) - 1
        self.index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index)  # stored dtype
        self._counts = (src_counts, tgt_counts)  # ids per pair, when stored (prepared data): no diff needed
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @property
    def src_lens(self) -> np.ndarray:
        """Source lengths as fed to the model: ids + EOS."""
        return lens_as_fed(self.src_offsets, self._counts[0])

    @property
    def tgt_lens(self) -> np.ndarray:
        """Decoder lengths: BOS + ids (= ids + EOS)."""
        return lens_as_fed(self.tgt_offsets, self._counts[1])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A padded batch: ``src`` = ids + EOS, ``tgt_in`` = BOS + ids, ``tgt_out`` = ids + EOS, ``index``."""
        rows_arr = np.asarray(rows, dtype=np.int64)
        src, src_lens = _padded(self.src_ids, self.src_offsets, rows_arr, self.pad_id)  # (b, s)
        tgt, tgt_lens = _padded(self.tgt_ids, self.tgt_offsets, rows_arr, self.pad_id)  # (b, t)
        b = np.arange(len(rows_arr))
        src[b, src_lens] = self.eos_id
        tgt_in = np.empty_like(tgt)  # (b, t)
        tgt_in[:, 0] = self.bos_id
        tgt_in[:, 1:] = tgt[:, :-1]
        tgt[b, tgt_lens] = self.eos_id  # tgt is now tgt_out
        return {
            "src": torch.from_numpy(src),
            "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt),
            "index": torch.from_numpy(self.index[rows_arr].astype(np.int64)),
        }

    def select(self, keep: np.ndarray) -> EncodedPairs:
        """The pairs where the boolean mask ``keep`` is True (positions in ``index`` are kept)."""
        src_ids, src_offsets = _select(self.src_ids, self.src_offsets, keep)
        tgt_ids, tgt_offsets = _select(self.tgt_ids, self.tgt_offsets, keep)
        return EncodedPairs(
            src_ids, src_offsets, tgt_ids, tgt_offsets, self.index[keep],
            pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id,
        )  # fmt: skip


def _padded(
    ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(b, longest + 1) int64 array of the rows' ids, right-padded, and the rows' id counts (b,)."""
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    cols = np.arange(int(lens.max(initial=0)) + 1)
    mask = cols < lens[:, None]  # (b, width)
    if len(ids) == 0:
        return np.full(mask.shape, pad_id, dtype=np.int64), lens
    pos = np.minimum(starts[:, None] + cols, len(ids) - 1)  # (b, width)
    return np.where(mask, ids[pos], pad_id).astype(np.int64), lens


def _select(ids: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lens = np.diff(offsets)
    token_keep = np.repeat(keep, lens)
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lens[keep], out=new_offsets[1:])
    return ids[token_keep], new_offsets


def identity_collate(batch: Any) -> Any:
    """The dataset's ``__getitems__`` already returns a collated batch (module level: workers pickle it)."""
    return batch
