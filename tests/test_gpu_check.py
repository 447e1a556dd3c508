"""``bench/gpu_check.py --cpu-smoke`` runs every part of the device check for a few steps on CPU, in under
a minute on the project's 2 idle cores (the real figures need an H200; see bench/README.md). The data copy
script is checked on the shared data the GPU run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_data  # noqa: E402

needs_data = pytest.mark.skipif(not (SHARED / "wmt_newstest_deen").is_dir(), reason=f"no {SHARED}")


@needs_data
def test_gpu_data_copies_the_smoke_runs_files(tmp_path) -> None:
    files = gpu_data.copy(SHARED, tmp_path)
    names = {str(f.relative_to(tmp_path)) for f in files}
    assert {"europarl_v7_deen_first20k/train.en", "wmt_newstest_deen/newstest2013.de"} <= names
    assert "wmt_news_deen_other_years/newstest2019.en" in names and len(names) % 2 == 0
    assert [p.name for p in gpu_data.train_prefixes(tmp_path)][:2] == ["train", "news-test2008"]
    assert (tmp_path / "wmt_newstest_deen/newstest2013.en").read_bytes() == (
        SHARED / "wmt_newstest_deen/newstest2013.en"
    ).read_bytes()


@needs_data
@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_ends_with_its_json(tmp_path) -> None:
    out = tmp_path / "out"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--data", str(SHARED), "--out-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "gpu_check.json").read_text())  # written as parts finish
    parts = report["parts"]
    assert list(parts) == ["train", "decode", "packing", "smoke", "compile"]
    assert not [p for p, r in parts.items() if "error" in r], parts
    for size in ("base", "big"):
        row = parts["train"][size]
        assert row["tok_s"] > 0 and row["params"] > 0 and row["memory_estimate_gb"] > 1.0
    assert parts["train"]["peak_flops"] == 989e12  # the H200's dense bf16 peak, named in the output
    assert parts["decode"]["ours_tok_s"] > 0 and parts["decode"]["tokens_per_sentence"] == 17
    assert [parts["packing"][n]["total_tok_s"] > 0 for n in ("1", "2")] == [True, True]
    smoke = parts["smoke"]
    assert smoke["steps"] == 20 and smoke["dev_loss_fell"] and smoke["ppl_dev"] > 1
    assert "skipped" in parts["compile"]
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] < cores / 2:  # the one-minute promise holds on idle cores only
        assert seconds < 60, seconds
