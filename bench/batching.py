"""Token-bucket batching: padding efficiency and loader speed on real Europarl text and the synthetic corpus.

Run: ``.venv/bin/python bench/batching.py [--quick] [--max-tokens 4096] [--vocab 8000]``

For each corpus the TranslationDataModule is set up as a run would (BPE vocabulary trained or loaded from
the cache, pairs encoded, ``data.max_len`` filter), then the training loader is iterated for whole epochs.

- padding efficiency: real tokens / tokens in the padded tensors, source and target together (and each
  side); BOS/EOS count as real, PAD does not. Target: >= 95% on Europarl at 4096 tokens.
- budget use: the longer side's padded tensor as a share of ``max_tokens`` (how full batches are).
- batches/s of the training loader in the main process (``num_workers=0``), collation included. A tiny
  model at ~38 ms/step consumes at most ~25 batches/s; the loader must be >= 20x faster.
- baseline: fairseq's scheme on the same lengths (sort by target then source length, cut greedily).

Europarl: the first 20k pairs of Europarl v7 De-En in ``../shared/data`` (relative to the repository root).
The LAST line is one JSON object with ``padding_efficiency`` and ``batches_per_s`` (Europarl) and the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from transformer_lit.buckets import greedy_boundaries  # noqa: E402
from transformer_lit.config import DataConfig  # noqa: E402
from transformer_lit.corpora import Corpus, load_corpus, read_parallel  # noqa: E402
from transformer_lit.data import TranslationDataModule  # noqa: E402
from transformer_lit.tokenizer import MODEL_FILE, cache_key, content_key  # noqa: E402

EUROPARL = ROOT / ".." / "shared" / "data" / "europarl_v7_deen_first20k"
TINY_MODEL_BATCHES_PER_S = 25.0  # 1 / 38 ms: the most a tiny model (d_model 64, one thread) can consume
REQUIRED_RATIO = 20.0
REQUIRED_EFFICIENCY = 0.95


def measure(name: str, cfg: DataConfig, corpus: Corpus, epochs: int) -> dict[str, float | int | str]:
    """Set up a DataModule on ``corpus`` as a run would, then iterate its training loader."""
    vocab_file = Path(cfg.cache_dir) / "tokenizers" / cache_key(content_key(corpus.train), cfg.vocab_size)
    cached = (vocab_file / MODEL_FILE).is_file()
    dm = TranslationDataModule(cfg, corpus=corpus)
    started = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - started
    loader = dm.train_dataloader()
    real_src = padded_src = real_tgt = padded_tgt = n_batches = 0
    used = []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            n_batches += 1
            src, tgt = batch["src"], batch["tgt_out"]
            real_src, real_tgt = real_src + int((src != 0).sum()), real_tgt + int((tgt != 0).sum())
            padded_src, padded_tgt = padded_src + src.numel(), padded_tgt + tgt.numel()
            used.append(max(src.numel(), tgt.numel()) / cfg.max_tokens)
    # loader speed without the statistics above: median over timed epochs of at least 0.2 s each
    rates = []
    for epoch in range(epochs, epochs + 5):
        loader.batch_sampler.set_epoch(epoch)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.2:
            count += sum(1 for _ in loader)
        rates.append(count / (time.perf_counter() - started))
    batches_per_s = float(np.median(rates))
    real, padded = real_src + real_tgt, padded_src + padded_tgt

    data = dm.train_data
    assert data is not None
    src_lens, tgt_lens = data.src_lens, data.tgt_lens
    order = np.lexsort((src_lens, tgt_lens))
    bounds = greedy_boundaries(src_lens[order], tgt_lens[order], cfg.max_tokens)
    base_padded = sum(
        (b - a) * int(src_lens[order[a:b]].max() + tgt_lens[order[a:b]].max())
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
    return {
        "corpus": name,
        "pairs": len(data),
        "dropped_max_len": dm.num_dropped,
        "vocab_size": dm.tokenizer.vocab_size,
        "vocab_cached": bool(cached),
        "max_tokens": cfg.max_tokens,
        "setup_s": round(setup_s, 2),
        "batches_per_epoch": len(loader),
        "padding_efficiency": round(real / padded, 4),
        "padding_efficiency_src": round(real_src / padded_src, 4),
        "padding_efficiency_tgt": round(real_tgt / padded_tgt, 4),
        "budget_use": round(float(np.mean(used)), 3),
        "real_tgt_tokens_per_batch": round(real_tgt / n_batches, 1),
        "baseline_fairseq_efficiency": round(float(src_lens.sum() + tgt_lens.sum()) / base_padded, 4),
        "baseline_fairseq_batches": len(bounds) - 1,
        "batches_per_s": round(batches_per_s, 1),
        "ratio_vs_tiny_model": round(batches_per_s / TINY_MODEL_BATCHES_PER_S, 1),
    }


def print_row(r: dict) -> None:
    print(
        f"{r['corpus']:<28} vocab {r['vocab_size']:>5} ({'cached' if r['vocab_cached'] else 'trained'}) "
        f"pairs {r['pairs']:>6} (dropped {r['dropped_max_len']}) setup {r['setup_s']:.2f}s\n"
        f"{'':<28} max_tokens {r['max_tokens']}: {r['batches_per_epoch']} batches/epoch, padding efficiency "
        f"{r['padding_efficiency']:.2%} (src {r['padding_efficiency_src']:.2%}, tgt "
        f"{r['padding_efficiency_tgt']:.2%}), budget use {r['budget_use']:.1%}, "
        f"{r['real_tgt_tokens_per_batch']:.0f} real target tokens/batch\n"
        f"{'':<28} fairseq-style sort+greedy on the same lengths: {r['baseline_fairseq_efficiency']:.2%} "
        f"in {r['baseline_fairseq_batches']} batches\n"
        f"{'':<28} loader {r['batches_per_s']:.0f} batches/s = {r['ratio_vs_tiny_model']:.0f}x what a tiny "
        f"model consumes (~{TINY_MODEL_BATCHES_PER_S:.0f}/s; required {REQUIRED_RATIO:.0f}x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch per corpus instead of three")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=8000, help="BPE size for Europarl")
    parser.add_argument("--cache-dir", default=str(ROOT / "results" / "cache"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    epochs = 1 if args.quick else 3

    rows = []
    if (EUROPARL / "train.en").is_file():
        pairs = read_parallel(EUROPARL / "train.en", EUROPARL / "train.de")
        cfg = DataConfig(vocab_size=args.vocab, max_tokens=args.max_tokens, cache_dir=args.cache_dir)
        rows.append(measure("europarl_v7_deen_first20k", cfg, Corpus(pairs, [], [], "europarl"), epochs))
    else:
        print(f"skipping Europarl: {EUROPARL.resolve()} not found")
    for max_tokens, label in ((args.max_tokens, ""), (1024, " (tiny)")):
        cfg = DataConfig(vocab_size=1000, max_tokens=max_tokens, cache_dir=args.cache_dir)
        rows.append(measure(f"synthetic{label}", cfg, load_corpus(cfg), epochs))
    for r in rows:
        print_row(r)

    head = rows[0]
    ok = all(r["ratio_vs_tiny_model"] >= REQUIRED_RATIO for r in rows)
    if head["corpus"].startswith("europarl"):
        ok = ok and head["padding_efficiency"] >= REQUIRED_EFFICIENCY
    target = f"efficiency >= {REQUIRED_EFFICIENCY:.0%} on Europarl, loader >= {REQUIRED_RATIO:.0f}x"
    print(f"requirements ({target}): {'met' if ok else 'NOT MET'}")
    summary = {
        "padding_efficiency": head["padding_efficiency"],
        "batches_per_s": head["batches_per_s"],
        "corpus": head["corpus"],
        "vocab_size": head["vocab_size"],
        "max_tokens": head["max_tokens"],
        "ratio_vs_tiny_model": head["ratio_vs_tiny_model"],
        "ok": ok,
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
