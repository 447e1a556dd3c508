"""Large downloads that survive a dropped connection: resumed with HTTP Range, checked by sha256.

pooch does the checking (the file is hashed and moved into place only if it matches; a mismatch deletes
it). What pooch lacks is resuming: its downloaders start from byte 0 into a fresh temporary file. So the
downloader given to pooch here keeps ``NAME.part`` beside the target and asks only for the missing bytes
(``Range: bytes=N-``); a server that ignores Range (answers 200, not 206) is read from the start. A
connection closed early is retried a few times, each retry resuming where the last one stopped; a run
killed half-way resumes the next time it is called.

Every failure is a ``DownloadError`` with a one-line message that names the URL.
"""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ATTEMPTS = 4
"""Connections per file before giving up; each one resumes where the previous one stopped."""
CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that failed: unreachable, refused, cut too often, or not the published file."""


def fetch(url: str, dest: str | Path, sha256: str | None, *, timeout: float = 60.0) -> Path:
    """``url`` downloaded to ``dest`` (resuming a partial download), its sha256 checked if one is known.

    An existing ``dest`` whose hash matches is kept without a download. Without a known hash the file is
    accepted as downloaded; callers record ``file_sha256(dest)`` then (a hash recorded on first download).
    """
    import pooch

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")

    def resuming_downloader(url: str, output_file: str, _pooch: Any) -> None:
        _download_resuming(url, part, timeout)
        shutil.move(part, output_file)  # pooch hashes output_file, then moves it to dest

    try:
        pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}" if sha256 else None,
            fname=dest.name,
            path=dest.parent,
            downloader=resuming_downloader,
        )
    except ValueError as err:  # pooch: the hash does not match; it deleted the file
        got = re.search(r"got\s+([0-9a-f]{64})", str(err))
        raise DownloadError(
            f"{url}: sha256 {got.group(1) if got else '?'} is not the published {sha256}; the corrupted "
            "download was deleted, run the command again"
        ) from None
    return dest


def file_sha256(path: str | Path) -> str:
    import pooch

    return pooch.file_hash(str(path), alg="sha256")


def _download_resuming(url: str, part: Path, timeout: float) -> None:
    """Append the missing bytes of ``url`` to ``part`` until whole, reconnecting up to ATTEMPTS times."""
    for attempt in range(1, ATTEMPTS + 1):
        have = part.stat().st_size if part.is_file() else 0
        try:
            if _stream(url, part, have, timeout):
                return
            problem = "the connection closed early"
        except urllib.error.HTTPError as err:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            problem = str(getattr(err, "reason", None) or err) or type(err).__name__
        got = part.stat().st_size if part.is_file() else 0
        log.warning(
            "download of %s stopped at %d bytes (%s); attempt %d of %d", url, got, problem, attempt, ATTEMPTS
        )
    raise DownloadError(
        f"{url}: download stopped {ATTEMPTS} times ({problem}); run the command again to resume from "
        f"{part.stat().st_size if part.is_file() else 0} bytes"
    )


def _stream(url: str, part: Path, have: int, timeout: float) -> bool:
    """One connection: append what the server sends to ``part``; True if the file is now whole."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is already whole
            return True
        raise
    with response:
        resumed = have > 0 and response.status == 206
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.stem, disable=None) as bar,
        ):
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total is None or part.stat().st_size >= total
