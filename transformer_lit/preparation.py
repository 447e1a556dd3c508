"""Prepare a corpus once: shared vocabulary, encoding on all cores, training-pair filters, a prepared folder.

``ensure_prepared(cfg)`` returns the folder of ``cfg``'s prepared data (format: ``prepared.py``), preparing
it first if it is missing. It is what ``tlit data prepare`` runs, what a grid, a sweep and the SLURM
launcher run once before their jobs start, and what a lone ``tlit train`` runs on first use.

The folder lives in ``cache_dir/prepared/<key>``. The key covers everything that decides its content: the
corpus (``corpora.corpus_key``: files' path, size and mtime, or the synthetic generator's settings; for a
corpus given in memory, a hash of its text), the vocabulary (a hash of ``tokenizer.model`` itself, so a
resumed run that brings its own vocabulary maps data encoded with exactly that one), ``data.max_len``,
``data.clean_ratio`` and the format version. A changed corpus file therefore gives a new key, never stale
data.

Two processes that need the same data at once (20 rows of a grid, DDP ranks) serialise on a file lock per
corpus: one prepares, the others wait and then map its result.

Training pairs are dropped here, once: those longer than ``data.max_len`` positions on a side (ids + EOS),
and, if ``data.clean_ratio`` is set, those whose subword counts differ by more than that factor (the ratio
filter of fairseq's prepare-wmt14en2de.sh, ``clean-corpus-n.perl -ratio 1.5``, whose length limit of 250
is ``data.max_len`` here). Dev and test pairs are never dropped; over-long ones are counted and kept.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transformer_lit import prepared as P
from transformer_lit.atomic import atomic_path
from transformer_lit.buckets import PLAN_VERSION, BatchPlan, lens_as_fed, plan_for
from transformer_lit.config import DataConfig
from transformer_lit.corpora import Corpus, corpus_key, load_corpus
from transformer_lit.tokenizer import Tokenizer, cache_path, content_key, load_or_train_tokenizer

log = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
ENCODE_CHUNK = 25_000
"""Pairs per encoding task: bounds the transient Python lists, and balances the worker processes."""
POOL_MIN_PAIRS = 4 * ENCODE_CHUNK
"""Smaller splits are encoded in this process (the synthetic corpus: 0.3 s, less than starting workers)."""


def ensure_prepared(
    cfg: DataConfig,
    *,
    corpus: Corpus | None = None,
    tokenizer_path: str | Path | None = None,
    force: bool = False,
) -> Path:
    """The prepared folder for ``cfg`` (and ``corpus``/``tokenizer_path`` if given), prepared if missing.

    Args:
        cfg: data settings; ``cfg.cache_dir`` holds the result.
        corpus: sentence pairs given in memory instead of ``load_corpus(cfg)`` (tests, benchmarks).
        tokenizer_path: encode with this vocabulary instead of the cached (or newly trained) one.
        force: prepare again even if the folder exists (it is replaced only once the new one is whole).
    """
    root = Path(cfg.cache_dir) / PREPARED_DIR
    ckey = corpus_identity(cfg, corpus)
    folder = _existing(cfg, root, ckey, corpus, tokenizer_path)
    if folder is not None and not force:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f"{ckey}.lock", ckey):
        folder = _existing(cfg, root, ckey, corpus, tokenizer_path)
        if folder is not None and not force:  # another process prepared it while we waited
            return folder
        return _prepare(cfg, root, ckey, corpus, tokenizer_path)


def corpus_identity(cfg: DataConfig, corpus: Corpus | None) -> str:
    """``corpora.corpus_key(cfg)``, or for a corpus given in memory a hash of all its text."""
    if corpus is None:
        return corpus_key(cfg)
    return content_key([*corpus.train, ("\x00dev", ""), *corpus.dev, ("\x00test", ""), *corpus.test])


def prepared_key(cfg: DataConfig, ckey: str, tokenizer_bytes: bytes) -> str:
    what = [P.FORMAT_VERSION, ckey, hashlib.sha256(tokenizer_bytes).hexdigest(), cfg.max_len, cfg.clean_ratio]
    return f"{ckey}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]}"


def _vocabulary_key(cfg: DataConfig, corpus: Corpus | None) -> str:
    """The tokenizer cache's key (as ``tokenizer.load_or_train_tokenizer`` has always used it)."""
    return corpus_key(cfg) if corpus is None else content_key(corpus.train)


def _existing(
    cfg: DataConfig, root: Path, ckey: str, corpus: Corpus | None, tokenizer_path: str | Path | None
) -> Path | None:
    """The prepared folder if it exists; None if it, or the vocabulary it depends on, does not."""
    vocab = Path(tokenizer_path) if tokenizer_path else cache_path(cfg, _vocabulary_key(cfg, corpus))
    if not vocab.is_file():
        return None
    folder = root / prepared_key(cfg, ckey, vocab.read_bytes())
    return folder if (folder / P.INDEX).is_file() else None


class _lock:
    """An exclusive file lock (``flock``: released by the kernel if its holder is killed)."""

    def __init__(self, path: Path, what: str) -> None:
        from filelock import FileLock

        self._lock = FileLock(path)
        self._what = what

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process that is preparing %s", self._what)
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _prepare(
    cfg: DataConfig, root: Path, ckey: str, corpus: Corpus | None, tokenizer_path: str | Path | None
) -> Path:
    started = time.perf_counter()
    vocabulary_key = _vocabulary_key(cfg, corpus)
    if corpus is None:
        corpus = load_corpus(cfg)
    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tokenizer = load_or_train_tokenizer(cfg, corpus, key=vocabulary_key)
    encode_started = time.perf_counter()
    folder = root / prepared_key(cfg, ckey, tokenizer.proto)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    log.info("preparing %s: encoding %d pairs on %d cores into %s", ckey, _total(corpus), cores, folder)
    with P.staging(folder) as tmp, Encoder(tokenizer, cores) as encoder:
        writer = P.ArrayWriter(tmp)
        splits = {s: _encode_split(writer, encoder, getattr(corpus, s), s, cfg) for s in P.SPLITS}
        for name in ("dev", "test"):
            P.write_json(tmp / P.pairs_file(name), [list(pair) for pair in getattr(corpus, name)])
        tokenizer.save(tmp / P.TOKENIZER)
        seconds = time.perf_counter() - started
        index = {
            "format": P.FORMAT_VERSION,
            "corpus_key": ckey,
            "corpus": corpus.name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": hashlib.sha256(tokenizer.proto).hexdigest(),
            "max_len": cfg.max_len,
            "clean_ratio": cfg.clean_ratio,
            "splits": splits,
            "seconds": round(seconds, 2),
            "arrays": writer.finish(),
        }
        P.write_json(tmp / P.INDEX, index)  # last: its presence means "complete"
    encoded = sum(s["read"] for s in splits.values())
    log.info(
        "prepared %s in %.1f s (encoding %.1f s, %.0f pairs/s): %s",
        folder,
        seconds,
        time.perf_counter() - encode_started,
        encoded / max(time.perf_counter() - encode_started, 1e-9),
        ", ".join(f"{name} {s['pairs']}" for name, s in splits.items()),
    )
    return folder


def _total(corpus: Corpus) -> int:
    return len(corpus.train) + len(corpus.dev) + len(corpus.test)


def encode_flat(
    tokenizer: Tokenizer, texts: Sequence[str], dtype: np.dtype, num_threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """All ids of ``texts`` concatenated (no specials) and the id count of each text."""
    encoded = tokenizer.encode_batch(texts, num_threads=num_threads)
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lens.sum()))
    return flat, lens


Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(source ids, source counts, target ids, target counts) of a chunk of pairs."""


def encode_chunk(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], dtype: np.dtype) -> Encoded:
    src_ids, n_src = encode_flat(tokenizer, [s for s, _ in pairs], dtype)
    tgt_ids, n_tgt = encode_flat(tokenizer, [t for _, t in pairs], dtype)
    return src_ids, n_src, tgt_ids, n_tgt


class Encoder:
    """Encodes chunks of pairs in one worker process per core, results in order, a few chunks in flight.

    Processes, not sentencepiece's threads: building the Python lists of ids holds the GIL, so 2 threads
    encode 100k Europarl sentences no faster than 1 (measured 1.93 s against 2.05 s; ``num_threads=-1``,
    which asks for every core of the host rather than of this process, took 3.3 s). The workers are
    spawned, not forked: a training process that prepares on first use has torch's threads running.
    """

    def __init__(self, tokenizer: Tokenizer, workers: int) -> None:
        self.tokenizer = tokenizer
        self.dtype = P.id_dtype(tokenizer.vocab_size)
        self.workers = workers
        self._pool: Any = None

    def _start_pool(self) -> Any:
        """The worker processes, started for the first split big enough to repay their start (~0.5 s)."""
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self.tokenizer.proto, self.dtype.str),
            )  # fmt: skip
        return self._pool

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def chunks(self, pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[int, Encoded]]:
        """(first pair's position, its chunk encoded) for consecutive chunks of ``pairs``."""
        starts = range(0, len(pairs), ENCODE_CHUNK)
        if self.workers < 2 or len(pairs) <= POOL_MIN_PAIRS:
            for start in starts:
                yield start, encode_chunk(self.tokenizer, pairs[start : start + ENCODE_CHUNK], self.dtype)
            return
        pool = self._start_pool()
        pending: collections.deque = collections.deque()
        for start in starts:
            pending.append((start, pool.submit(_encode_in_worker, pairs[start : start + ENCODE_CHUNK])))
            if len(pending) >= 2 * self.workers:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


_worker: tuple[Tokenizer, np.dtype] | None = None


def _init_worker(proto: bytes, dtype: str) -> None:
    """Load the vocabulary once per worker, and end the worker when its parent dies (a killed preparation
    must not leave workers encoding for nobody: they would wait on their task queue forever)."""
    global _worker
    _worker = (Tokenizer(proto), np.dtype(dtype))
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _encode_in_worker(pairs: Sequence[tuple[str, str]]) -> Encoded:
    assert _worker is not None
    return encode_chunk(_worker[0], pairs, _worker[1])


def _encode_split(
    writer: P.ArrayWriter, encoder: Encoder, pairs: Sequence[tuple[str, str]], split: str, cfg: DataConfig
) -> dict[str, Any]:
    """Encode one split chunk by chunk into the writer; returns its counts for the index."""
    dtype = encoder.dtype
    is_train = split == "train"
    lens: dict[str, list[np.ndarray]] = {"src": [], "tgt": []}
    kept: list[np.ndarray] = []
    counts = {"read": len(pairs), "dropped_max_len": 0, "dropped_ratio": 0, "long": 0}
    for side in lens:  # every array exists, also for an empty split
        writer.append(f"{split}.{side}_ids", np.zeros(0, dtype=dtype), dtype)
    for start, (src_ids, n_src, tgt_ids, n_tgt) in encoder.chunks(pairs):
        sides = {"src": (src_ids, n_src), "tgt": (tgt_ids, n_tgt)}
        too_long = (n_src + 1 > cfg.max_len) | (n_tgt + 1 > cfg.max_len)  # lengths as fed: ids + EOS/BOS
        keep = np.ones(len(n_src), dtype=bool)
        if is_train:
            keep &= ~too_long
            counts["dropped_max_len"] += int(too_long.sum())
            if cfg.clean_ratio is not None:
                skewed = keep & ((n_src > cfg.clean_ratio * n_tgt) | (n_tgt > cfg.clean_ratio * n_src))
                keep &= ~skewed
                counts["dropped_ratio"] += int(skewed.sum())
        else:
            counts["long"] += int(too_long.sum())
        for side, (ids, n) in sides.items():
            writer.append(f"{split}.{side}_ids", ids[np.repeat(keep, n)], dtype)
            lens[side].append(n[keep])
        kept.append(start + np.flatnonzero(keep))
    index = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    if is_train and len(pairs) and not len(index):
        raise ValueError(
            f"data.max_len={cfg.max_len}"
            + (f" and data.clean_ratio={cfg.clean_ratio}" if cfg.clean_ratio is not None else "")
            + f" drop all {len(pairs)} training pairs; raise data.max_len"
        )
    for side, parts in lens.items():
        n = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(n) + 1, dtype=np.int64)
        np.cumsum(n, out=offsets[1:])
        writer.append(f"{split}.{side}_offsets", offsets, np.int64)
        writer.append(f"{split}.{side}_lens", n, P.smallest_uint(int(n.max(initial=0))))
    writer.append(f"{split}.index", index, P.smallest_uint(max(len(pairs) - 1, 0)))
    return {"pairs": len(index), **counts}


# ----------------------------------------------------------------------------------------------------------
# The training batch plan, stored beside the prepared data


def ensure_plan(folder: str | Path, max_tokens: int) -> Path:
    """The stored training batch plan of a prepared folder for ``max_tokens``, computed and saved if missing.

    Planning ~100k batches of a 1M-pair corpus takes seconds of Python (``buckets.plan_batches``), which
    every run, seed and DDP rank would pay again: the grid, the sweep, ``tlit data prepare`` and a run's
    ``prepare_data`` (local rank 0, before the other ranks set up) store it once here.
    """
    path = Path(folder) / P.plan_file(max_tokens, PLAN_VERSION)
    if not path.is_file():
        _plan_and_save(P.map_prepared(folder), max_tokens)
    return path


def load_plan(data: P.PreparedData, max_tokens: int) -> BatchPlan:
    """The training batch plan (``buckets.plan_for`` of the stored lengths), read from its file if that is
    whole and holds every training pair exactly once; computed (and saved) otherwise."""
    path = data.folder / P.plan_file(max_tokens, PLAN_VERSION)
    n = int(data.index["splits"]["train"]["pairs"])
    try:
        with np.load(path, allow_pickle=False) as stored:
            positions, starts = stored["positions"], stored["starts"]
        whole = len(starts) and starts[0] == 0 and starts[-1] == n and np.all(np.diff(starts) > 0)
        if whole and np.array_equal(np.bincount(positions, minlength=n), np.ones(n, dtype=np.int64)):
            return BatchPlan(positions, starts.astype(np.int64))  # positions stay in their stored dtype
        log.warning("%s does not match %s; planning the batches again", path, P.INDEX)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("%s is unreadable (%s); planning the batches again", path, err)
    return _plan_and_save(data, max_tokens)


def _plan_and_save(data: P.PreparedData, max_tokens: int) -> BatchPlan:
    src_offsets, src_counts = data.side("train", "src")[1:]
    tgt_offsets, tgt_counts = data.side("train", "tgt")[1:]
    src_lens, tgt_lens = lens_as_fed(src_offsets, src_counts), lens_as_fed(tgt_offsets, tgt_counts)
    started = time.perf_counter()
    plan = plan_for(src_lens, tgt_lens, max_tokens)
    n = len(src_lens)
    path = data.folder / P.plan_file(max_tokens, PLAN_VERSION)
    try:  # a reader sees the whole plan or none; racing writers write the same plan
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, positions=plan.positions.astype(P.smallest_uint(max(n - 1, 0))), starts=plan.starts)
    except OSError as err:  # a read-only cache: runs plan for themselves
        log.warning("cannot store the batch plan in %s (%s); every run plans it again", data.folder, err)
    log.info("planned %d training batches of max_tokens=%d in %.1f s", len(plan), max_tokens,
             time.perf_counter() - started)  # fmt: skip
    return plan
