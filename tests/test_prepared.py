"""Prepared data: written once, mapped by every run; killed, raced, damaged, stale and bad input.

Preparation runs in subprocesses where a test needs a real kill or a real race (no torch there: the
preparation imports numpy and sentencepiece only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transformer_lit import prepared as P
from transformer_lit.config import DataConfig
from transformer_lit.corpora import CorpusError, corpus_key, write_synthetic
from transformer_lit.preparation import ENCODE_CHUNK, POOL_MIN_PAIRS, ensure_prepared
from transformer_lit.tokenizer import sample_training_text, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
PREPARE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from transformer_lit.config import DataConfig
from transformer_lit.preparation import ensure_prepared
print(ensure_prepared(DataConfig(**json.loads(sys.argv[1])), tokenizer_path=sys.argv[2] or None))
"""


def text_corpus(root: Path, copies: int = 1, pairs: int = 400) -> DataConfig:
    """The synthetic corpus as text files, its training split repeated ``copies`` times; lines distinct."""
    write_synthetic(root, DataConfig(synthetic_pairs=pairs, synthetic_eval_pairs=20))
    if copies > 1:
        for lang in ("en", "de"):
            lines = (root / f"train.{lang}").read_text().splitlines()
            text = "".join(f"{line} {k}\n" for k in range(copies) for line in lines)
            (root / f"train.{lang}").write_text(text)
    return DataConfig(
        corpus="text", train=(str(root / "train"),), dev=str(root / "dev"), test=str(root / "test"),
        vocab_size=120, max_tokens=400, cache_dir=str(root / "cache"),
    )  # fmt: skip


def as_json(cfg: DataConfig) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()})


def start_preparing(cfg: DataConfig, tokenizer: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", PREPARE, as_json(cfg), str(tokenizer or "")]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line(error_type: type[Exception], call) -> str:
    with pytest.raises(error_type) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_prepared_arrays_hold_the_encoded_corpus(tmp_path: Path) -> None:
    cfg = text_corpus(tmp_path)
    folder = ensure_prepared(cfg)
    data = P.map_prepared(folder)
    index = data.index
    assert index["format"] == P.FORMAT_VERSION and index["corpus_key"] == corpus_key(cfg)
    assert index["splits"]["train"]["pairs"] == 400 and data.pairs("dev")[0][0]
    ids, offsets, lens = data.side("train", "src")
    assert ids.dtype == np.uint8 and isinstance(ids, np.memmap) and not ids.flags.writeable  # 120 pieces
    np.testing.assert_array_equal(np.diff(offsets), lens)
    from transformer_lit.tokenizer import Tokenizer

    tok = Tokenizer.load(folder / P.TOKENIZER)
    first = (tmp_path / "train.en").read_text().splitlines()[0]
    assert tok.decode(ids[offsets[0] : offsets[1]]) == first
    P.verify(folder)
    assert ensure_prepared(cfg) == folder  # mapped, not prepared again


def test_max_len_and_ratio_filter_train_only(tmp_path: Path) -> None:
    cfg = text_corpus(tmp_path)
    full = P.map_prepared(ensure_prepared(cfg))
    n_src = full.side("train", "src")[2].astype(int)
    n_tgt = full.side("train", "tgt")[2].astype(int)
    limit = int(np.median(n_src)) + 1
    strict = DataConfig(**{**vars(cfg), "max_len": limit, "clean_ratio": 1.2})
    data = P.map_prepared(ensure_prepared(strict))
    too_long = (n_src + 1 > limit) | (n_tgt + 1 > limit)
    skewed = ~too_long & ((n_src > 1.2 * n_tgt) | (n_tgt > 1.2 * n_src))
    stats = data.index["splits"]
    assert stats["train"]["dropped_max_len"] == too_long.sum() > 0
    assert stats["train"]["dropped_ratio"] == skewed.sum() > 0
    np.testing.assert_array_equal(data.arrays["train.index"], np.flatnonzero(~too_long & ~skewed))
    assert stats["dev"]["pairs"] == 20 and stats["dev"]["long"] > 0  # dev is never filtered


def test_killed_preparation_leaves_nothing_used_and_reruns(tmp_path: Path) -> None:
    copies = (POOL_MIN_PAIRS + ENCODE_CHUNK) // 400  # big enough for worker processes, and time to kill it
    cfg = text_corpus(tmp_path, copies=copies)
    tok = train_tokenizer(sample_training_text([("a b c d e f g h", "i j k l m n o p")] * 10), 40)
    tok.save(tmp_path / "tok.model")
    proc = start_preparing(cfg, tmp_path / "tok.model")
    root = Path(cfg.cache_dir) / "prepared"
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in root.glob(".tmp-*/train.src_ids.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert workers  # it encodes in worker processes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(root.glob("*/index.json"))  # the half-written folder is not a prepared folder
    assert list(root.glob(".tmp-*"))
    folder = ensure_prepared(cfg, tokenizer_path=tmp_path / "tok.model")  # prepares again
    assert P.map_prepared(folder).index["splits"]["train"]["pairs"] == copies * 400
    assert not list(root.glob(".tmp-*"))  # the killed run's leftovers are gone
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # its encoding workers end too
        assert time.monotonic() < deadline, f"workers {workers} outlived their killed parent"
        time.sleep(0.1)


def test_two_preparers_one_prepares_the_other_waits_and_maps(tmp_path: Path) -> None:
    from filelock import FileLock

    cfg = text_corpus(tmp_path)
    lock = FileLock(Path(cfg.cache_dir) / "prepared" / f"{corpus_key(cfg)}.lock")
    (Path(cfg.cache_dir) / "prepared").mkdir(parents=True)
    with lock:  # hold the lock until both are waiting, so that they truly race for it
        procs = [start_preparing(cfg) for _ in range(2)]
        logs = ["", ""]
        for i, proc in enumerate(procs):
            assert proc.stderr is not None
            while "waiting for another process" not in logs[i]:
                line = proc.stderr.readline()
                assert line, f"preparer {i} ended: {logs[i]}"
                logs[i] += line
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1 and (Path(folders.pop()) / P.INDEX).is_file()
    logs = [log + err for log, (_, err) in zip(logs, outs, strict=True)]
    assert sum(log.count(": encoding ") for log in logs) == 1  # one prepared; the other mapped its result


def test_damaged_files_fail_in_one_line_and_nothing_is_deleted(tmp_path: Path) -> None:
    cfg = text_corpus(tmp_path)
    folder = ensure_prepared(cfg)
    target = folder / "train.tgt_ids.bin"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF  # same size, other bytes: only the checksum sees it
    target.write_bytes(data)
    P.map_prepared(folder)
    message = one_line(P.PreparedDataError, lambda: P.verify(folder))
    assert str(target) in message and "tlit data prepare --force" in message
    target.write_bytes(data[:-3])  # truncated: every map sees it
    message = one_line(P.PreparedDataError, lambda: P.map_prepared(folder))
    assert str(target) in message and "tlit data prepare --force" in message
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == sizes | {target.name: len(data) - 3}

    from transformer_lit.data import TranslationDataModule

    dm = TranslationDataModule(cfg)
    assert str(target) in one_line(P.PreparedDataError, dm.setup)  # a run reports it the same way
    rebuilt = ensure_prepared(cfg, force=True)
    assert rebuilt == folder and P.verify(folder) is None and target.stat().st_size == sizes[target.name]


def test_batch_plan_is_stored_once_checked_when_read_and_replanned_if_damaged(tmp_path: Path, caplog) -> None:
    import logging

    from transformer_lit.buckets import plan_for
    from transformer_lit.data import TranslationDataModule
    from transformer_lit.preparation import ensure_plan, load_plan

    cfg = text_corpus(tmp_path, copies=3)
    folder = ensure_prepared(cfg)
    data = P.map_prepared(folder)
    want = plan_for(data.side("train", "src")[2] + 1, data.side("train", "tgt")[2] + 1, cfg.max_tokens)
    path = ensure_plan(folder, cfg.max_tokens)
    assert path.parent == folder and str(cfg.max_tokens) in path.name
    stored = path.read_bytes()

    def same(plan: list[np.ndarray]) -> bool:
        return len(plan) == len(want) and all(np.array_equal(a, b) for a, b in zip(plan, want, strict=True))

    with caplog.at_level(logging.INFO, logger="transformer_lit.preparation"):
        assert same(load_plan(data, cfg.max_tokens))
        dm = TranslationDataModule(cfg)
        dm.setup()  # a run reads the stored plan: nothing planned again
        assert not [r for r in caplog.records if r.getMessage().startswith("planned ")]
        assert len(dm.train_dataloader()) == len(want)
        for damage in (stored[: len(stored) // 2], b"not a zip", None):
            if damage is None:  # whole, but a pair twice and another never: refused as well
                with np.load(path) as f:
                    positions, starts = f["positions"].copy(), f["starts"]
                positions[0] = positions[1]
                with open(path, "wb") as out:
                    np.savez(out, positions=positions, starts=starts)
            else:
                path.write_bytes(damage)
            caplog.clear()
            assert same(load_plan(data, cfg.max_tokens))  # planned again...
            assert len([r for r in caplog.records if "planning the batches again" in r.getMessage()]) == 1
            assert path.read_bytes() == stored  # ...and stored again
    assert ensure_plan(folder, 2 * cfg.max_tokens) != path  # one plan per max_tokens


def test_changed_corpus_file_gives_a_new_key(tmp_path: Path) -> None:
    cfg = text_corpus(tmp_path)
    first = ensure_prepared(cfg)
    for lang, line in (("en", "one more sentence ."), ("de", "noch ein satz .")):
        with open(tmp_path / f"train.{lang}", "a") as f:
            f.write(line + "\n")
    second = ensure_prepared(cfg)
    assert second != first
    assert P.map_prepared(second).index["splits"]["train"]["pairs"] == 401


def test_bad_corpora_fail_in_one_line_naming_file_and_line(tmp_path: Path) -> None:
    cfg = text_corpus(tmp_path)
    en, de = tmp_path / "train.en", tmp_path / "train.de"
    lines = en.read_bytes().splitlines(keepends=True)
    en.write_bytes(b"".join(lines[:-1]))
    message = one_line(CorpusError, lambda: ensure_prepared(cfg))
    assert f"{en} has 399 lines" in message and str(de) in message
    en.write_bytes(b"".join(lines[:6] + [b"caf\xe9 au lait\n"] + lines[7:]))
    assert f"{en}: line 7 is not valid UTF-8" in one_line(CorpusError, lambda: ensure_prepared(cfg))
    en.write_bytes(b"\n" * 400)
    message = one_line(CorpusError, lambda: ensure_prepared(cfg))
    assert "empty corpus" in message and str(en) in message
    assert not list((Path(cfg.cache_dir) / "prepared").glob("*/index.json"))


def test_too_large_vocabulary_is_one_line_naming_the_files(tmp_path: Path, caplog) -> None:
    cfg = DataConfig(**{**vars(text_corpus(tmp_path)), "vocab_size": 37000})
    folder = ensure_prepared(cfg)
    warnings = [r.getMessage() for r in caplog.records if "data.vocab_size=37000" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "train.en") in warnings[0]
    assert P.map_prepared(folder).index["vocab_size"] < 37000  # what the corpus supports, used as it is


# -- the harness: `tlit data prepare`, and preparing before any job starts ---------------------------------
def test_cli_prepare_verify_and_force(tmp_path: Path, capsys) -> None:
    from experiments.cli import main

    cfg = text_corpus(tmp_path)
    args = ["data", "prepare", f"data.train=[{cfg.train[0]}]", f"data.dev={cfg.dev}", f"data.test={cfg.test}"]
    args += ["data.corpus=text", "data.vocab_size=120", f"data.cache_dir={cfg.cache_dir}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    folder = Path(printed.split(":")[0])
    assert (folder / P.INDEX).is_file() and "train 400" in printed
    assert len(list(folder.glob("train.plan-*.npz"))) == 1  # the batch plan for these settings' max_tokens
    target = folder / "dev.src_ids.bin"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(data)
    assert main([*args, "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(target) in err and "--force" in err
    assert main([*args, "--force", "--verify"]) == 0


def test_prepare_for_prepares_each_data_setting_once(tmp_path: Path, capsys) -> None:
    import dataclasses
    import io

    from experiments.runs.prepare import prepare_for
    from transformer_lit.config import RunConfig

    data = text_corpus(tmp_path)
    configs = [
        RunConfig(data=data),
        RunConfig(data=dataclasses.replace(data, num_workers=2)),  # how it is loaded: the same data
        RunConfig(data=dataclasses.replace(data, max_len=20)),
    ]
    out = io.StringIO()
    folders = prepare_for(configs, out)
    assert len(folders) == 2 == out.getvalue().count("data ready in") and folders[0] != folders[1]
    assert all((f / P.INDEX).is_file() for f in folders)
    assert all(len(list(f.glob(f"train.plan-*-{data.max_tokens}.npz"))) == 1 for f in folders)


def test_grid_without_its_data_fails_before_any_job_in_one_line(tmp_path: Path, capsys) -> None:
    from experiments.cli import main

    runs = tmp_path / "runs"
    code = main(
        ["grid", "run", "table3", "--scale", "small", "--rows", "base", "--runs", str(runs),
         f"data.cache_dir={tmp_path / 'cache'}"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "tlit data wmt14 --out" in err
    assert not runs.exists()  # no job started, no run folder made
