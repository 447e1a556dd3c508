"""The prepared-data format: a corpus encoded once into flat arrays on disk that every run maps read-only.

Encoding WMT14 (4.5M pairs) in every run costs minutes and gigabytes per process (issue 13 measured 36 s
and 1.96 GB on a 1M-pair corpus); a mapped file costs neither, and the pages are shared by every process
on the node. The format is fairseq's MMapIndexedDataset's: raw little-endian numpy arrays read with
``np.memmap``, plus an index; nothing is pickled. A prepared folder holds::

    index.json             written last: format version, corpus key, vocabulary hash, counts, and for every
                           array its file, dtype, length and sha256
    tokenizer.model        the vocabulary the ids belong to
    SPLIT.src_ids.bin      source ids of all pairs, concatenated, no specials (uint16 below 65,536 pieces)
    SPLIT.src_offsets.bin  int64, n + 1: pair i is src_ids[offsets[i]:offsets[i + 1]]
    SPLIT.src_lens.bin     ids per pair (the smallest unsigned dtype that fits)
    SPLIT.tgt_*.bin        the same for the targets
    SPLIT.index.bin        each kept pair's position in its split (dropped training pairs leave gaps)
    dev.pairs.json, test.pairs.json    (source, reference) strings, for BLEU
    train.plan-vV-T.npz    the training batch plan for max_tokens T (plan version V), added on first need

A folder is written under a temporary name and renamed last (``staging``), so a killed preparation leaves
nothing that a run would map. Mapping checks every file's size against the index, which is cheap; the
sha256 sums are compared only by ``verify`` (``tlit data prepare --verify``): hashing ~0.5 GB on every run
would cost seconds. No torch here: ``tlit data prepare`` and the grid's pre-preparation stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
"""Bump when the layout changes; older folders are then rebuilt under a new key."""
INDEX = "index.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "dev", "test")
SIDE_ARRAYS = ("ids", "offsets", "lens")
REBUILD_HINT = "rebuild it with `tlit data prepare --force` and the same data settings"
_TMP_PREFIX = ".tmp-"


class PreparedDataError(ValueError):
    """A prepared folder that cannot be used: missing, damaged, or of another format version."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return smallest_uint(vocab_size - 1)


def smallest_uint(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def pairs_file(split: str) -> str:
    return f"{split}.pairs.json"


def plan_file(max_tokens: int, version: int) -> str:
    """The stored training batch plan for one ``max_tokens`` (``preparation.ensure_plan``), added to a
    finished folder by the first process that needs it; not listed in the index, checked when read."""
    return f"train.plan-v{version}-{max_tokens}.npz"


class ArrayWriter:
    """Appends arrays chunk by chunk to ``FOLDER/NAME.bin``, hashing as it writes (no second read)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[str, tuple[Any, Any, np.dtype, list[int]]] = {}

    def append(self, name: str, chunk: np.ndarray, dtype: np.dtype | type) -> None:
        dtype = np.dtype(dtype)
        if name not in self._open:
            f = open(self.folder / f"{name}.bin", "wb")  # noqa: SIM115 - closed in finish()
            self._open[name] = (f, hashlib.sha256(), dtype, [0])
        f, digest, want, length = self._open[name]
        if want != dtype:
            raise TypeError(f"{name}: appending {dtype} to an array of {want}")
        data = np.ascontiguousarray(chunk, dtype=want.newbyteorder("<"))
        f.write(memoryview(data).cast("B"))
        digest.update(memoryview(data).cast("B"))
        length[0] += len(data)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Close every file (flushed to disk) and return the index's ``arrays`` entry."""
        arrays = {}
        for name, (f, digest, dtype, length) in self._open.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            arrays[name] = {"file": f"{name}.bin", "dtype": dtype.str, "length": length[0]}
            arrays[name]["sha256"] = digest.hexdigest()
        self._open.clear()
        return arrays


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes ``final`` when the block ends without an exception.

    Earlier temporary folders of the same name are removed first: callers hold the preparation lock, so
    they belong to a preparation that was killed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{_TMP_PREFIX}{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # rebuilt (--force): the old folder goes only now, when the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class PreparedData:
    """A mapped prepared folder: its index and every array, read-only."""

    folder: Path
    index: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def side(self, split: str, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, offsets, lens) of one side (``src`` or ``tgt``) of a split."""
        return tuple(self.arrays[f"{split}.{side}_{what}"] for what in SIDE_ARRAYS)  # type: ignore[return-value]

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """The (source, reference) strings of dev or test."""
        rows = json.loads((self.folder / pairs_file(split)).read_text("utf-8"))
        return [(s, t) for s, t in rows]


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise PreparedDataError(f"{path} is missing: {folder} is not prepared data; {REBUILD_HINT}") from None
    except (OSError, ValueError) as err:
        raise PreparedDataError(f"{path} is unreadable ({err}); {REBUILD_HINT}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        got = index.get("format") if isinstance(index, dict) else None
        raise PreparedDataError(f"{path}: format {got!r}, this code reads {FORMAT_VERSION}; {REBUILD_HINT}")
    return index


def map_prepared(folder: str | Path) -> PreparedData:
    """Map every array of a prepared folder read-only, after checking each file's size against the index."""
    folder = Path(folder)
    index = read_index(folder)
    arrays = {}
    for name, meta in index["arrays"].items():
        path = folder / meta["file"]
        dtype = np.dtype(meta["dtype"])
        want = int(meta["length"]) * dtype.itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise PreparedDataError(f"{path} is missing; {REBUILD_HINT}") from None
        if size != want:
            raise PreparedDataError(
                f"{path} has {size} bytes but {INDEX} says {want}: the prepared data is damaged; "
                f"{REBUILD_HINT}"
            )
        # np.memmap cannot map an empty file (an empty test split)
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if want else np.zeros(0, dtype=dtype)
    return PreparedData(folder, index, arrays)


def verify(folder: str | Path) -> None:
    """Compare every array file's sha256 with the index; ``PreparedDataError`` names the first bad file."""
    folder = Path(folder)
    for meta in map_prepared(folder).index["arrays"].values():
        path = folder / meta["file"]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != meta["sha256"]:
            raise PreparedDataError(
                f"{path}: sha256 {digest.hexdigest()[:16]}... differs from {INDEX}'s "
                f"{meta['sha256'][:16]}...: the prepared data is damaged; {REBUILD_HINT}"
            )
