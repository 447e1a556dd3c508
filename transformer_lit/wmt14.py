"""WMT14 En-De, the paper's data: download the statmt.org archives once and lay out plain text files.

``tlit data wmt14 --out DIR`` (``prepare_wmt14``) writes into DIR: ``train.en/.de`` (Europarl v7 +
CommonCrawl + News Commentary v9, concatenated as in the paper), ``newstest2013.en/.de`` (dev) and
``newstest2014.en/.de`` (test, read from the official SGML release: the full 3003-segment set), then the
marker ``PREPARED.json`` that ``data.corpus=wmt14`` looks for. ``tlit data prepare data.corpus=wmt14`` then
encodes it once for every run (``preparation.py``).

The archives are downloaded into DIR/downloads with ``download.fetch``: resumable (a cut connection or a
killed command continues where it stopped), with a progress bar, and checked against the sha256 and size
that Hugging Face's wmt14 dataset script recorded for exactly these URLs (``ARCHIVES`` cites it). The
server is probed first with a short timeout, so an offline machine fails in seconds with one line naming
the URL.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from transformer_lit.atomic import write_atomic
from transformer_lit.corpora import USE_TEXT_HINT, WMT14_MARKER, CorpusError, read_parallel
from transformer_lit.download import DownloadError, fetch, file_sha256

log = logging.getLogger(__name__)


class Archive(NamedTuple):
    url: str
    sha256: str | None
    """Published sha256, or None where no record exists (then the hash is recorded on first download)."""


# The sha256 values are those of Hugging Face's wmt14 dataset script for these very URLs: "download_checksums"
# in huggingface/datasets, datasets/wmt14/dataset_infos.json, commit 22d3b80586cab756b70d6c939ceace94bb356a8c
# (also: europarl 657,632,379 bytes, commoncrawl 918,311,367, nc-v9 80,418,416, dev 38,654,961). The dev/test
# archive is WMT19's dev.tgz, which that script uses for newstest2013 and newstest2014 (it holds every
# earlier test set); statmt.org's wmt14/dev.tgz and test-full.tgz have no published hash we could find.
ARCHIVES = {
    "training-parallel-europarl-v7.tgz": Archive(
        "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
        "0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7",
    ),
    "training-parallel-commoncrawl.tgz": Archive(
        "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
        "c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5",
    ),
    "training-parallel-nc-v9.tgz": Archive(
        "http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz",
        "cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485",
    ),
    "dev.tgz": Archive(
        "http://data.statmt.org/wmt19/translation-task/dev.tgz",
        "7a7deccf82ebb05ba508dba5eb21356492224e8f630ec4f992132b029b4b25e7",
    ),
}
TRAIN_MEMBERS = (  # (archive, member prefix): PREFIX.en / PREFIX.de inside the archive
    ("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
    ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
    ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en"),
)
DEV_MEMBER = "dev/newstest2013"  # .en / .de, plain text
TEST_MEMBERS = (  # (English file, German file): the en-de release, else the de-en one (the same segments)
    ("dev/newstest2014-deen-src.en.sgm", "dev/newstest2014-deen-ref.de.sgm"),
    ("dev/newstest2014-deen-ref.en.sgm", "dev/newstest2014-deen-src.de.sgm"),
)


def prepare_wmt14(
    out_dir: str | Path, *, connect_timeout: float = 5.0, archives: dict[str, Archive] | None = None
) -> Path:
    """Download (or resume) the archives into ``out_dir/downloads`` and write the text files and marker.

    Raises ``CorpusError`` (one line) when the server is unreachable, a download fails or its hash differs,
    or an archive lacks a file.
    """
    out = Path(out_dir).expanduser()
    if (out / WMT14_MARKER).is_file():
        log.info("WMT14 is already prepared in %s", out)
        return out
    archives = archives or ARCHIVES
    first = next(iter(archives.values())).url
    problem = _unreachable(first, connect_timeout)
    if problem:
        raise CorpusError(f"the WMT14 download is not reachable ({first}: {problem}); {USE_TEXT_HINT}")
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, archive in archives.items():
        try:
            fetch(archive.url, downloads / name, archive.sha256)
        except DownloadError as err:
            raise CorpusError(str(err)) from None
        hashes[name] = archive.sha256 or file_sha256(downloads / name)
        if archive.sha256 is None:
            log.warning("no published sha256 for %s; recorded %s", archive.url, hashes[name])
    counts = _write_train(out, downloads)
    test_pairs = _write_dev_test(out, downloads / "dev.tgz")
    marker = {
        "sources": {name: a.url for name, a in archives.items()},
        "sha256": hashes,
        "train_lines": counts,
        "test_pairs": test_pairs,
    }
    write_atomic(out / WMT14_MARKER, json.dumps(marker, indent=1))
    log.info("WMT14 En-De prepared in %s: %d training lines", out, sum(counts.values()))
    return out


def _write_train(out: Path, downloads: Path) -> dict[str, int]:
    counts = {}
    with open(out / "train.en", "wb") as en, open(out / "train.de", "wb") as de:
        for archive, member in TRAIN_MEMBERS:
            with tarfile.open(downloads / archive) as tar:
                n_en, n_de = _copy_member(tar, f"{member}.en", en), _copy_member(tar, f"{member}.de", de)
            if n_en != n_de:
                lines = f"{member}.en has {n_en} lines but {member}.de has {n_de}"
                raise CorpusError(f"mismatched line counts in {archive}: {lines}")
            counts[member] = n_en
    return counts


def _write_dev_test(out: Path, archive: Path) -> int:
    """newstest2013 as it is; newstest2014 from its SGML, as ``newstest2014.en/.de``; returns test pairs."""
    with tarfile.open(archive) as tar:
        for lang in ("en", "de"):
            with open(out / f"newstest2013.{lang}", "wb") as f:
                _copy_member(tar, f"{DEV_MEMBER}.{lang}", f)
        names = set(tar.getnames())
        members = next((m for m in TEST_MEMBERS if set(m) <= names), TEST_MEMBERS[0])
        for member in members:
            with open(out / Path(member).name, "wb") as f:
                _copy_member(tar, member, f)
    pairs = read_parallel(out / Path(members[0]).name, out / Path(members[1]).name, "sgml")
    for side, lang in enumerate(("en", "de")):
        (out / f"newstest2014.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    return len(pairs)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why ``url`` cannot be reached within ``timeout`` seconds (DNS included), or None if it answers."""
    result: list[str | None] = ["timed out"]

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result[0] = None
        except urllib.error.HTTPError as err:  # the server answered: reachable
            result[0] = None if err.code < 500 else f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            result[0] = str(getattr(err, "reason", err))

    thread = threading.Thread(target=probe, daemon=True)  # a resolver can ignore socket timeouts
    thread.start()
    thread.join(timeout + 1.0)
    return result[0]


def _copy_member(tar: tarfile.TarFile, name: str, out) -> int:
    """Append one archive member to ``out``, ending it with a newline; returns its line count."""
    try:
        src = tar.extractfile(name)
    except KeyError:
        src = None
    if src is None:
        raise CorpusError(f"{tar.name} has no file {name}")
    lines, last = 0, b"\n"
    while chunk := src.read(1 << 20):
        lines += chunk.count(b"\n")
        last = chunk[-1:]
        out.write(chunk)
    if last != b"\n":
        out.write(b"\n")
        lines += 1
    return lines
