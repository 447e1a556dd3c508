"""The numbers a result table derives from its runs: agreement with the paper, Spearman's rho, significance of
BLEU against base, and the training cost. No torch import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.runs import folder as RF
from experiments.tables import sources
from transformer_lit.config import ModelConfig
from transformer_lit.params import decoder_layer_params, encoder_layer_params

log = logging.getLogger(__name__)

MOVE_THRESHOLD = 0.05
"""The paper's PPL (or BLEU) "moved" when it changed by at least this much from its base."""
BOOTSTRAP_N = 1000
BOOTSTRAP_SEED = 12345  # sacrebleu's default seed (0 would mean "unseeded" to it)
ATTENTION_CONTEXT = 32
"""Assumed mean sentence length in subword tokens for the attention terms of the FLOPs estimate."""
FLOPS_FORMULA = (
    "train FLOPs ~ 6 T (N (P_enc_layer + P_dec_layer) + d_model V) + 18 T N L h (d_k + d_v), "
    f"T = target tokens seen, source as long as target, L = {ATTENTION_CONTEXT}; "
    "device-h = wall seconds x devices / 3600"
)


# ----------------------------------------------------------------------------------------------------------
# Training cost


def training_flops(config: dict[str, Any], summary: dict[str, Any], train_tokens: float) -> float:
    """Estimated training FLOPs of one run, the quantity of the paper's Table 2 "training cost" column.

    Counted from the model rather than from GPU time (the paper multiplies GPU-days by a sustained FLOP rate,
    3.3e18 for base; counted this way base is ~1e18). Per target token seen, with the source side taken to
    be as long as the target side (as in WMT En-De):

    - ``2 N (P_enc_layer + P_dec_layer)``: every layer's weights, one multiply-add each;
    - ``2 d_model V``: the pre-softmax projection;
    - ``6 N L h (d_k + d_v)``: ``Q K^T`` and ``weights V`` of encoder self-, decoder self- and
      encoder-decoder attention over ``L`` positions;

    and training costs 3x the forward pass (the backward pass ~2x). Embedding lookups, softmax and
    LayerNorm are left out. NaN when the config or the token count is unusable.
    """
    try:
        model = ModelConfig(**{k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("model.")})
        vocab = summary.get("vocab_size") or config["data.vocab_size"]
        layers = model.num_layers * (encoder_layer_params(model) + decoder_layer_params(model))
        attention = 6 * model.num_layers * ATTENTION_CONTEXT * model.num_heads * (model.d_k + model.d_v)
        return 3 * train_tokens * (2 * layers + 2 * model.d_model * float(vocab) + attention)
    except (TypeError, ValueError, KeyError):
        return math.nan


def device_count(summary: dict[str, Any], config: dict[str, Any]) -> int:
    """Devices a run trained on: from the summary's device string ("2x NVIDIA H100", "cpu (1 threads) x1"),
    else ``train.devices`` of its config."""
    device = str(summary.get("device", ""))
    match = re.match(r"\s*(\d+)x ", device) or re.search(r"\sx(\d+)\s*$", device)
    if match:
        return int(match.group(1))
    devices = config.get("train.devices", 1)
    return devices if isinstance(devices, int) and devices > 0 else 1


# ----------------------------------------------------------------------------------------------------------
# Agreement with the paper


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank); NaN pairs dropped.

    Written out because pandas' ``corr(method="spearman")`` needs scipy, which we do not install.
    NaN for fewer than three pairs or a constant side.
    """
    pairs = pd.DataFrame({"x": list(x), "y": list(y)}, dtype=float).dropna()
    if len(pairs) < 3 or pairs["x"].nunique() < 2 or pairs["y"].nunique() < 2:
        return math.nan
    return float(pairs["x"].rank().corr(pairs["y"].rank()))


def same_way(ours: float, paper: float, threshold: float = MOVE_THRESHOLD) -> str:
    """Whether our change went the paper's way: "yes"/"no" where the paper's change is at least ``threshold``
    and ours is known, "" elsewhere (those rows are not counted)."""
    if math.isnan(ours) or math.isnan(paper) or abs(paper) < threshold - 1e-9:
        return ""
    return "yes" if ours * paper > 0 else "no"


AGREEMENT = (  # ours, the paper's, short name, the name of our change
    ("ppl_dev", "paper_ppl", "ppl", "d_ppl"),
    ("bleu_dev_tok", "paper_bleu", "bleu", "d_bleu_tok"),
)
"""Like with like: the paper's BLEU is tokenized and compound-split, so our change is that of
``bleu_dev_tok`` (``transformer_lit.metrics.tokenized_bleu``); sacreBLEU stays a column of its own."""


def add_agreement(frame: pd.DataFrame, base_row: str) -> pd.DataFrame:
    """Changes from base, ours (from our base) and the paper's (from its base), and whether they agree."""
    frame = frame.copy()
    base = frame[frame["row"] == base_row]
    for ours, paper, short, delta in AGREEMENT:
        our_base = float(base.iloc[0][ours]) if len(base) else math.nan
        paper_base = float(base.iloc[0][paper]) if len(base) else math.nan
        is_base = frame["row"] == base_row
        frame[delta] = (frame[ours] - our_base).where(~is_base)
        frame[f"paper_d_{short}"] = (frame[paper] - paper_base).round(4).where(~is_base)  # 4.97-4.92 is 0.05
        pairs = zip(frame[delta].astype(float), frame[f"paper_d_{short}"].astype(float), strict=True)
        frame[f"{short}_same_way"] = [same_way(o, p) for o, p in pairs]
    return frame


def _agreement_line(frame: pd.DataFrame, what: str, short: str) -> str:
    judged = frame[frame[f"{short}_same_way"] != ""]
    if judged.empty:
        return f"{what}: no row to compare (needs our base and the paper's rows)"
    agree = judged[judged[f"{short}_same_way"] == "yes"]
    differ = ", ".join(judged.loc[judged[f"{short}_same_way"] == "no", "row"])
    return (
        f"{what} moved the same way as the paper's in {len(agree)} of {len(judged)} rows "
        f"where the paper's moved by at least {MOVE_THRESHOLD}" + (f" (not in {differ})" if differ else "")
    )


def summary_lines(frame: pd.DataFrame, records: list[sources.RunRecord], seeds: list[int]) -> list[str]:
    """The lines under the table: run counts, agreement, Spearman's rho, significance and cost."""
    counts: dict[str, int] = {}
    for row in frame["row"]:
        recs = [r for r in records if r.row == row and r.seed is not None]
        for rec in recs:
            counts[rec.status] = counts.get(rec.status, 0) + 1
        missing = len(set(seeds) - {r.seed for r in recs}) if recs else max(len(seeds), 1)
        counts[sources.MISSING] = counts.get(sources.MISSING, 0) + missing
    runs = ", ".join(f"{counts[s]} {s}" for s in sources.STATUSES if counts.get(s))
    n_seeds = max(len(seeds), 1)
    lines = [f"runs: {runs} ({len(frame)} rows x {n_seeds} seed{'s' if n_seeds > 1 else ''})"]
    lines.append(_agreement_line(frame, "dev PPL", "ppl"))
    lines.append(_agreement_line(frame, "dev BLEU (tokenized and compound-split, as the paper's)", "bleu"))
    both = frame[["ppl_dev", "paper_ppl"]].dropna()
    rho = spearman(both["ppl_dev"], both["paper_ppl"])
    lines.append(
        f"Spearman correlation of dev PPL with the paper's over {len(both)} rows: "
        + ("n/a" if math.isnan(rho) else f"{rho:.2f}")
    )
    tested = frame["p_bleu"].dropna()
    if tested.empty:
        lines.append(
            f"p (BLEU): none (needs {RF.HYPS_DEV} and {RF.REFS_DEV} in the run folders of a row and base)"
        )
    else:
        lines.append(
            f"p (BLEU): sacreBLEU's paired bootstrap resampling ({BOOTSTRAP_N} resamples, "
            f"seed {BOOTSTRAP_SEED}) of each row's dev output against base's of the same seed; "
            f"p < 0.05 in {(tested < 0.05).sum()} of {len(tested)} rows"
        )
    done = [
        r for r in records if r.status == RF.RunState.COMPLETE and not math.isnan(r.metric("wall_seconds"))
    ]
    hours = sum(r.metric("wall_seconds") * device_count(r.summary, r.config or {}) / 3600 for r in done)
    lines.append(f"cost: {FLOPS_FORMULA}; all complete runs: {hours:.3g} device-hours")
    return lines


# ----------------------------------------------------------------------------------------------------------
# Significance: sacreBLEU's paired bootstrap, every row against one base at once


def bleu_significance(
    by_row: dict[str, list[sources.RunRecord]],
    base_row: str,
    *,
    n: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
    cache: Path | None = None,
) -> dict[str, tuple[float, str]]:
    """``{row: (p, note)}``: each row's dev BLEU against base's, on the lowest seed both completed with their
    dev hypotheses (``hyps_dev.txt``) and references (``refs_dev.txt``) saved.

    p-values are kept in ``cache`` (a JSON file beside the runs), keyed by a hash of both outputs, the
    references and the test's settings: a finished comparison never changes, and the test is the slowest
    part of a table (~0.1 s per row for 500 sentences).
    """
    bases = {
        r.seed: r for r in by_row.get(base_row, []) if r.status == RF.RunState.COMPLETE and r.path is not None
    }
    lines: dict[Any, list[str] | None] = {}

    def read(rec: sources.RunRecord, name: str) -> list[str] | None:
        key = (rec.path, name)
        if key not in lines:
            lines[key] = sources.read_lines(rec.path / name)
        return lines[key]

    jobs: dict[int, dict[str, list[str]]] = {}
    out: dict[str, tuple[float, str]] = {}
    for row, recs in by_row.items():
        usable = [
            r for r in recs if r.status == RF.RunState.COMPLETE and r.path is not None and r.seed in bases
        ]
        for rec in sorted(usable, key=lambda r: r.seed) if row != base_row else []:
            base = bases[rec.seed]
            hyps, refs = read(rec, RF.HYPS_DEV), read(rec, RF.REFS_DEV)
            base_hyps, base_refs = read(base, RF.HYPS_DEV), read(base, RF.REFS_DEV)
            if not all((hyps, refs, base_hyps, base_refs)):
                continue
            if refs != base_refs:
                out[row] = (math.nan, f"seed{rec.seed}: dev references differ from base's; no p-value")
            elif len(hyps) != len(refs) or len(base_hyps) != len(refs):
                out[row] = (math.nan, f"seed{rec.seed}: {len(hyps)} hypotheses for {len(refs)} references")
            else:
                jobs.setdefault(rec.seed, {})[row] = hyps
            break
    known = _read_cache(cache)
    fresh: dict[str, float] = {}
    for k, systems in jobs.items():
        base_hyps, refs = read(bases[k], RF.HYPS_DEV), read(bases[k], RF.REFS_DEV)
        keys = {row: _cache_key(base_hyps, hyps, refs, n, seed) for row, hyps in systems.items()}
        todo = {row: hyps for row, hyps in systems.items() if keys[row] not in known}
        computed = paired_bootstrap_many(base_hyps, todo, refs, n=n, seed=seed) if todo else {}
        fresh.update({keys[row]: p for row, p in computed.items()})
        note = "" if k == min(bases) else f"p from seed{k}"
        out.update({row: (computed[row] if row in computed else known[keys[row]], note) for row in systems})
    if fresh and cache is not None:
        _write_cache(cache, {**known, **fresh})
    return out


def _cache_key(base_hyps: list[str], hyps: list[str], refs: list[str], n: int, seed: int) -> str:
    from importlib.metadata import version  # importing sacrebleu itself costs ~0.2 s

    digest = hashlib.sha256(f"{n}:{seed}:{version('sacrebleu')}".encode())
    for text in (base_hyps, hyps, refs):
        digest.update(hashlib.sha256("\n".join(text).encode()).digest())
    return digest.hexdigest()


def _read_cache(path: Path | None) -> dict[str, float]:
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a broken cache is only a slower table
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


def _write_cache(path: Path, values: dict[str, float]) -> None:
    """Atomically; a read-only runs folder just means no cache."""
    try:
        RF.write_atomic(path, json.dumps(values, indent=0, sort_keys=True) + "\n")
    except OSError as err:
        log.debug("no significance cache at %s: %s", path, err)


def paired_bootstrap_many(
    base_hyps: Sequence[str],
    systems: dict[str, Sequence[str]],
    refs: Sequence[str],
    *,
    n: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
    """p-values of sacreBLEU's paired bootstrap test (``PairedTest(test_type="bs")``) of each system against
    one base: the same resamples, statistic and p-value as ``transformer_lit.metrics.paired_bootstrap``
    (tested to agree), several times faster for a table's 20 rows.

    sacreBLEU recomputes the references' and the base's statistics for every pair and scores each of the
    ``n`` resamples in a Python loop. Here the references are read once, a sentence's statistics are
    computed once however many systems output it (rows often agree on most sentences), and all resampled
    scores of a system come from one matrix product and :func:`_bleu_from_stats`. Identical outputs get
    p = 1, as in metrics.py.
    """
    import numpy as np
    from sacrebleu.metrics import BLEU

    metric = BLEU(references=[list(refs)])  # the defaults of metrics.sacre_bleu: exp smoothing, 13a
    size = len(refs)
    idxs = np.random.default_rng(seed).choice(size, size=(n, size), replace=True)  # sacrebleu's draw
    counts = np.bincount((np.arange(n)[:, None] * size + idxs).ravel(), minlength=n * size)
    counts = counts.reshape(n, size).astype(np.float64)  # (n, size): how often resample i draws sentence j
    memo: dict[tuple[int, str], list[int]] = {}

    def sentence_stats(hyps: Sequence[str]) -> list[list[int]]:
        """``metric._extract_corpus_statistics(hyps, None)``, remembering each (sentence, output) pair."""
        out = []
        for i, hyp in enumerate(hyps):
            if (i, hyp) not in memo:
                segment = metric._preprocess_segment(hyp)
                memo[i, hyp] = metric._compute_segment_statistics(segment, metric._ref_cache[i])
            out.append(memo[i, hyp])
        return out

    base_stats = sentence_stats(base_hyps)
    base_score = metric._aggregate_and_compute(base_stats).score
    base_scores = _bleu_from_stats(counts @ np.asarray(base_stats, dtype=np.float64))  # (n,)
    p_values = {}
    for name, hyps in systems.items():
        if list(hyps) == list(base_hyps):
            p_values[name] = 1.0
            continue
        stats = sentence_stats(hyps)
        diff = abs(base_score - metric._aggregate_and_compute(stats).score)
        sample = np.abs(_bleu_from_stats(counts @ np.asarray(stats, dtype=np.float64)) - base_scores)
        p_values[name] = float((np.sum(sample - sample.mean() > diff) + 1) / (n + 1))
    return p_values


def _bleu_from_stats(stats: Any) -> Any:
    """BLEU of each row of summed sentence statistics ``[sys_len, ref_len, correct_1..4, total_1..4]``.

    ``sacrebleu.BLEU.compute_bleu`` (exp smoothing, no effective order) vectorised, float32 precisions
    included: sacrebleu sums resampled statistics as float32, so its precisions are float32 too.
    """
    import numpy as np

    k = (stats.shape[1] - 2) // 2
    sys_len, ref_len = stats[:, 0], stats[:, 1]
    correct, total = stats[:, 2 : 2 + k].astype(np.float32), stats[:, 2 + k :].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0), 1.0)
        zero = correct == 0
        smooth = (2.0 ** np.cumsum(zero, axis=1)).astype(np.float32)  # doubles at each order without a match
        precision = np.where(zero, np.float32(100) / (smooth * total), np.float32(100) * correct / total)
        stopped = np.cumsum(total == 0, axis=1) > 0  # compute_bleu stops at the first order with no n-grams
        logs = np.where(stopped, -9999999999.0, np.log(precision.astype(np.float64)))
    score = bp * np.exp(sum(logs[:, i] for i in range(k)) / k)
    return np.where(correct.sum(axis=1) == 0, 0.0, score)
