"""The batch plan: which pairs go together in a token bucket, computed from their lengths with numpy alone.

Split from ``batching.py`` (the sampler and the Dataset, which need torch) so that the plan can be computed
where torch is not imported: ``preparation.ensure_plan`` computes it once per prepared corpus and
``max_tokens`` and stores it beside the prepared data, because planning a WMT-sized corpus in every run
costs seconds (issue 13: 1M pairs at the tiny scale's 480 tokens are ~100k batches). ``PLAN_VERSION`` is
part of the stored plan's file name: bump it whenever a change here changes any plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

PLAN_VERSION = 1
"""Bump when ``plan_batches`` (or what it calls) gives other batches for the same lengths."""


def lens_as_fed(offsets: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """(n,) sequence lengths as the model sees them: ids per pair (``counts`` when stored, else from the
    ``offsets``) + 1 for EOS or BOS. int32: they are sort keys and token budgets, so half the memory of
    int64 for a WMT-sized split, and no pair is 2^31 tokens long."""
    return np.add(np.diff(offsets) if counts is None else counts, 1, dtype=np.int32)


@dataclass(frozen=True)
class BatchPlan:
    """Batches as two flat arrays: batch ``i`` is ``positions[starts[i]:starts[i + 1]]``.

    A Python list of one small array per batch costs ~200 bytes a batch in object headers (~20 MB for the
    ~100k batches of a 1M-pair corpus, in every run and DDP rank, and again for each epoch's shuffled
    copy); two flat arrays cost the positions themselves, in the stored dtype. Iterating and indexing
    give the batches as array views, so a plan reads like the list it replaces.
    """

    positions: np.ndarray
    """(n,) every pair position exactly once, batch after batch."""
    starts: np.ndarray
    """(batches + 1,) int64 offsets into ``positions``; ``starts[0] == 0``, ``starts[-1] == n``."""

    @classmethod
    def from_batches(cls, batches: Sequence[np.ndarray]) -> BatchPlan:
        starts = np.zeros(len(batches) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in batches], out=starts[1:])
        positions = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        return cls(positions, starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.positions[self.starts[i] : self.starts[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def balanced(self, world_size: int) -> BatchPlan:
        """Split the largest batch in two (the first such, at half its size) until the number of batches
        is a multiple of ``world_size``, so that every DDP rank gets as many; stops early if no batch has
        two pairs left."""
        starts = self.starts
        while (len(starts) - 1) % world_size:  # never true for 0 batches, so there is a largest one
            sizes = np.diff(starts)
            k = int(np.argmax(sizes))
            if sizes[k] < 2:
                break
            starts = np.insert(starts, k + 1, starts[k] + sizes[k] // 2)
        return self if starts is self.starts else BatchPlan(self.positions, starts)


def greedy_boundaries(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int) -> list[int]:
    """Start offsets of batches cut greedily along a sequence of lengths (plus the end offset).

    A batch takes the next pair while (pairs + 1) * (longest side so far) stays within ``max_tokens``.
    That cost never decreases as a batch grows, so each cut is found with numpy on a window no longer than
    the batch can be (``max_tokens // first length + 1``): one Python step per batch, not per pair.
    """
    longer = np.maximum(np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64))
    n = len(longer)
    starts = [0]
    i = 0
    while i < n:
        width = min(n - i, max_tokens // max(int(longer[i]), 1) + 1)
        cost = np.maximum.accumulate(longer[i : i + width]) * np.arange(1, width + 1)  # (width,)
        i += max(1, int(np.searchsorted(cost, max_tokens, side="right")))
        starts.append(i)
    if n == 0:
        starts.append(0)
    return starts


def plan_batches(
    src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, *, leaf_batches: int = 4, fill: float = 0.95
) -> list[np.ndarray]:
    """Group pair positions into batches whose source and target lengths are both close.

    Sorting by one length and cutting greedily leaves the other side ragged (about 87% of padded tokens
    real on Europarl at 4096 tokens; fairseq's scheme). Here the (source, target) length plane is split
    like a k-d tree: a region is halved along the side whose lengths spread more, at the point that
    halves its estimated number of batches, until a region holds about ``leaf_batches`` batches. Each
    region is then cut greedily along whichever of three orders (source-major, target-major, longer side
    then length difference) gives the fewest batches, then the least padding. On Europarl (8k BPE, 4096
    tokens) this gives about 95.4% real tokens at about 92% of the token budget per batch.

    Args:
        src_lens, tgt_lens: (n,) lengths as fed to the model.
        max_tokens: per-side budget of a batch, padding included.
        leaf_batches: batches per region cut greedily (larger: fuller batches, more padding).
        fill: expected budget use, for the initial estimate of the number of batches.

    Returns:
        Arrays of positions into ``src_lens``; every position appears in exactly one batch.
    """
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    if len(src_lens) == 0:
        return []
    longer = np.maximum(src_lens, tgt_lens)
    out: list[np.ndarray] = []
    stack = [(np.arange(len(src_lens)), max(1, int(np.ceil(longer.sum() / (max_tokens * fill)))))]
    while stack:
        pos, n_batches = stack.pop()
        s, t = src_lens[pos], tgt_lens[pos]
        if n_batches <= leaf_batches or len(pos) == 1:
            out.extend(_best_greedy(pos, src_lens, tgt_lens, max_tokens))
            continue
        order = pos[np.lexsort((t, s)) if np.ptp(s) >= np.ptp(t) else np.lexsort((s, t))]
        left = n_batches // 2
        need = np.cumsum(longer[order])  # tokens of the longer side, a proxy for batches needed
        cut = int(np.clip(np.searchsorted(need, need[-1] * left / n_batches), 1, len(order) - 1))
        stack.append((order[cut:], n_batches - left))
        stack.append((order[:cut], left))  # popped first: batches come out in a locality-preserving order
    return out


def _best_greedy(
    pos: np.ndarray, src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int
) -> list[np.ndarray]:
    s, t = src_lens[pos], tgt_lens[pos]
    best: tuple[int, int, list[np.ndarray]] | None = None
    for order in (np.lexsort((t, s)), np.lexsort((s, t)), np.lexsort((t, s - t, np.maximum(s, t)))):
        p = pos[order]
        bounds = greedy_boundaries(src_lens[p], tgt_lens[p], max_tokens)
        cuts = np.asarray(bounds[:-1])
        sizes = np.diff(bounds)
        longest = np.maximum.reduceat(src_lens[p], cuts) + np.maximum.reduceat(tgt_lens[p], cuts)
        padded = int((sizes * longest).sum())
        if best is None or (len(cuts), padded) < best[:2]:
            best = (len(cuts), padded, np.split(p, cuts[1:]))
    assert best is not None
    return best[2]


def plan_for(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int) -> BatchPlan:
    """The batch plan of ``TokenBucketBatchSampler`` (positions into the canonical length order), which a
    caller may compute once and hand to every sampler of the same data (it depends on no rank or seed)."""
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    canonical = np.lexsort((np.arange(len(src_lens)), tgt_lens, src_lens))
    return BatchPlan.from_batches(plan_batches(src_lens[canonical], tgt_lens[canonical], max_tokens))
