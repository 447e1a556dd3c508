"""WMT14 download against a real HTTP server on loopback, serving tar archives built here in WMT14's layout.

Covers: resuming with a Range request after the server cut a download half-way, a corrupted archive
failing its sha256 in one line, an unreachable server failing fast with the URL, the extracted layout,
and a micro training run on the prepared corpus.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transformer_lit import wmt14
from transformer_lit.config import DataConfig
from transformer_lit.corpora import CorpusError, load_corpus, write_synthetic
from transformer_lit.wmt14 import Archive, prepare_wmt14

FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``files`` with Range support; logs every request.

    A name in ``cut`` is served half-way once (full Content-Length announced, then the connection closes).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.send_response(200 if self.path.lstrip("/") in server.files else 404)
                self.end_headers()

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers["Range"] else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.cut and not start:
                    server.cut.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def archives(self, hashes: dict[str, str | None] | None = None) -> dict[str, Archive]:
        hashes = hashes or {}
        return {
            name: Archive(self.url(name), hashes.get(name, hashlib.sha256(data).hexdigest()))
            for name, data in self.files.items()
        }


def tgz(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def wmt14_files(tmp_path: Path, pairs: int = 90) -> dict[str, bytes]:
    """Archives with WMT14's member names; training text from the synthetic corpus, split in three."""
    write_synthetic(tmp_path / "text", DataConfig(synthetic_pairs=pairs, synthetic_eval_pairs=10))
    en = (tmp_path / "text" / "train.en").read_text().splitlines(keepends=True)
    de = (tmp_path / "text" / "train.de").read_text().splitlines(keepends=True)
    third = len(en) // 3
    parts = [slice(0, third), slice(third, 2 * third), slice(2 * third, None)]
    files = {}
    for (archive, member), part in zip(wmt14.TRAIN_MEMBERS, parts, strict=True):
        files[archive] = tgz({f"{member}.en": "".join(en[part]), f"{member}.de": "".join(de[part])})
    files["dev.tgz"] = tgz(
        {
            "dev/newstest2013.en": (tmp_path / "text" / "dev.en").read_text(),
            "dev/newstest2013.de": (tmp_path / "text" / "dev.de").read_text(),
            "dev/newstest2014-deen-src.en.sgm": (FIXTURES / "news-src.en.sgm").read_text(),
            "dev/newstest2014-deen-ref.de.sgm": (FIXTURES / "news-ref.de.sgm").read_text(),
        }
    )
    return files


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(wmt14_files(tmp_path))
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def one_line_error(call) -> str:
    with pytest.raises(CorpusError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_layout_and_hashes(server: Server, tmp_path: Path) -> None:
    archives = server.archives(hashes={"dev.tgz": None})  # no published hash: recorded on first download
    out = prepare_wmt14(tmp_path / "wmt14", archives=archives)
    corpus = load_corpus(DataConfig(corpus="wmt14", train=(str(out),)))
    assert len(corpus.train) == 90 and len(corpus.dev) == 10
    assert corpus.test[2] == ("The match ended 2-1.", "Das Spiel endete 2:1.")  # parsed from the SGML
    marker = (out / "PREPARED.json").read_text()
    assert hashlib.sha256(server.files["dev.tgz"]).hexdigest() in marker
    assert not list((out / "downloads").glob("*.part"))
    before = len(server.requests)
    assert prepare_wmt14(out, archives=archives) == out and len(server.requests) == before  # no-op


def test_cut_download_resumes_with_a_range_request(server: Server, tmp_path: Path) -> None:
    name = "training-parallel-europarl-v7.tgz"
    server.cut.add(name)
    out = prepare_wmt14(tmp_path / "wmt14", archives=server.archives())
    gets = [rng for n, rng in server.requests if n == name]
    half = len(server.files[name]) // 2
    assert gets == [None, f"bytes={half}-"]  # the second request asked only for the missing half
    assert (out / "downloads" / name).read_bytes() == server.files[name]


def test_corrupted_archive_fails_its_checksum_in_one_line(server: Server, tmp_path: Path) -> None:
    name = "training-parallel-nc-v9.tgz"
    published = hashlib.sha256(server.files[name]).hexdigest()
    archives = server.archives()
    server.files[name] = server.files[name][:-10] + b"corrupted!"  # same size, other bytes
    message = one_line_error(lambda: prepare_wmt14(tmp_path / "wmt14", archives=archives))
    assert server.url(name) in message and published in message and "run the command again" in message
    downloads = tmp_path / "wmt14" / "downloads"
    assert not (downloads / name).exists() and not list(downloads.glob(f"{name}*"))  # nothing corrupt kept
    assert (downloads / "training-parallel-europarl-v7.tgz").is_file()  # what was good stays


def test_unreachable_server_fails_fast_naming_the_url(tmp_path: Path) -> None:
    # A closed local port and a reserved documentation address (RFC 5737): only failing connects.
    for url in ("http://127.0.0.1:9/training-parallel-nc-v9.tgz", "http://192.0.2.1/dev.tgz"):
        start = time.monotonic()
        call = lambda url=url: prepare_wmt14(  # noqa: E731
            tmp_path / "w", connect_timeout=1.0, archives={"x.tgz": Archive(url, None)}
        )
        message = one_line_error(call)
        assert time.monotonic() - start < 5.0 and "not reachable" in message and url in message
        assert "data.corpus=text" in message  # and the way out
    assert not (tmp_path / "w").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prepared_wmt14_trains_a_micro_run(server: Server, tmp_path: Path, caplog) -> None:
    import logging
    import re

    from experiments.cli import main

    out = prepare_wmt14(tmp_path / "wmt14", archives=server.archives())
    overrides = [
        "data.corpus=wmt14", f"data.train=[{out}]", "data.vocab_size=200", "data.max_tokens=300",
        f"data.cache_dir={tmp_path / 'cache'}", "model.num_layers=1", "model.d_model=16", "model.d_ff=32",
        "model.num_heads=2", "model.d_k=8", "model.d_v=8", "train.max_steps=2", "train.wandb=false",
        "train.progress_bar=false", "eval.beam_size=1", "eval.max_sentences=4",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="transformer_lit.data"):
        assert main(["train", "--out", str(tmp_path / "run"), *overrides]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ready in ")]
    assert len(ready) == 1 and re.match(r"data ready in \d+\.\d s: \d+ train / 10 dev", ready[0]), ready
    assert len(list((tmp_path / "cache" / "prepared").glob("wmt14-*/index.json"))) == 1
