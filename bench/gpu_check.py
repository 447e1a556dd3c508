"""One device check for a GPU node (issue 15): training speed and MFU, memory, packing, decoding, a real run.

    python bench/gpu_data.py                                  # first: copy the data into bench/gpu_data/
    python bench/gpu_check.py --out-dir OUT [--budget 300]    # on the GPU machine: <= 5 minutes on an H200
    python bench/gpu_check.py --cpu-smoke --out-dir OUT       # every part for a few steps on CPU, < 1 minute

Parts, in this order; each writes ``OUT/gpu_check.json`` when it finishes (a run cut short still reports what
it measured), and the LAST line printed is that JSON object:

1. ``train``: paper-base and big training throughput in bf16 (``bench/train_throughput.py``'s loop, our
   model only, 256 x 64-token batches): target tokens/s and MFU = (6 x parameters x target tokens +
   attention FLOPs) / time / peak, the peak named in the output (H200 dense bf16: 989e12 FLOP/s); also
   ``train_throughput``'s padded-matmul MFU. Peak GPU memory (``max_memory_allocated``) beside
   ``transformer_lit.memory``'s estimate for the same batch.
2. ``decode``: beam 4 at paper-base dims, ours against HF ``generate`` (Marian of the same dims, random
   weights: ``bench/decode_speed.py``'s builders) on the first 500 sentences of newstest2013. Random weights
   end sentences at random, so both are forced to one output length (EOS suppressed, min = max length); the
   sources are the sentences' words hashed into the vocabulary, cut or repeated to one length, so that the
   forced length is the same for every sentence on both sides. Reports tokens/s each and the ratio.
3. ``packing``: 1, 2, 4 and 8 processes training the tiny row on the one GPU at once (each its share of
   the CPU threads); total target tokens/s over the same timed window, and its ratio to one job.
4. ``smoke``: the ``small`` scale's base on real text (Europarl + other years' news, dev newstest2013;
   ``bench/gpu_data.py``), about 2 minutes of training through the real run path (``experiments.runs``),
   then its dev PPL and BLEU; checks that the dev loss fell.
5. ``compile``: part 1 again with ``torch.compile`` (as ``train.compile`` does it) while time is left;
   compile time reported. Skipped in ``--cpu-smoke`` (inductor's CPU compile alone takes minutes here).

It also writes ``OUT/gpu_calibration.json`` (``experiments.launchers.calibration``) from parts 1 and 3, for
``tlit grid plan --calibration``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import decode_speed as ds  # noqa: E402
import gpu_data  # noqa: E402
import torch  # noqa: E402
import train_throughput as tt  # noqa: E402

from experiments.launchers.calibration import write_calibration  # noqa: E402
from transformer_lit import config as C  # noqa: E402
from transformer_lit import memory as M  # noqa: E402
from transformer_lit.atomic import write_atomic  # noqa: E402

H200_PEAK = 989e12
"""H200 (and H100 SXM) dense bf16 tensor-core FLOP/s, NVIDIA's data sheet."""
GPU_SIZES = {
    "base": tt.Size("base", 6, 512, 2048, 8, 37000, 256, 64, 64),
    "big": tt.Size("big", 6, 1024, 4096, 16, 37000, 256, 64, 64),
}
SMOKE_SIZES = {  # the same parts on CPU in seconds: shapes shrunk, code paths kept
    "base": tt.Size("base", 2, 64, 256, 4, 1000, 8, 16, 16),
    "big": tt.Size("big", 2, 128, 512, 8, 1000, 8, 16, 16),
}
TINY_ROW = tt.Size("tiny", 6, 64, 256, 8, 1000, 24, 20, 20)
"""Table 3's base at the tiny scale (d_model 64, h 8, N 6, 480 tokens per batch): the packing part."""


# ----------------------------------------------------------------------------------------------------------
# Shared


class Check:
    """The run's settings, its deadline and its report (written after every part)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else args.device)
        self.out = Path(args.out_dir)
        self.data = Path(args.data)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.report: dict[str, Any] = {
            "device": name,
            "peak_flops_bf16": tt.gpu_peak(self.device) if self.device.type == "cuda" else None,
            "peak_named": "H200 dense bf16 989e12 FLOP/s (H100 SXM the same; A100 312e12)",
            "mode": "cpu-smoke" if self.smoke else "gpu",
            "torch": torch.__version__,
            "parts": {},
        }

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, part: str, result: dict[str, Any]) -> None:
        self.report["parts"][part] = result
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "gpu_check.json", json.dumps(self.report, indent=1) + "\n")
        print(f"[{self.report['elapsed_s']:6.1f} s] {part}: {json.dumps(result)}", flush=True)


def sync(device: torch.device) -> None:
    tt.sync(device)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_flops(size: tt.Size) -> float:
    """QK^T and AV of every attention, forward + backward (3x forward), for one padded batch."""
    b, s, t, hd, n = size.batch, size.src_len, size.tgt_len, size.num_heads * size.d_k, size.num_layers
    return 3.0 * b * n * (4 * s * s * hd + 4 * t * t * hd + 4 * t * s * hd)


def estimate_for(size: tt.Size) -> int:
    """``transformer_lit.memory``'s estimate for the bench's batch: max_tokens = the padded batch, the plain
    (unchunked) loss the bench's loop uses, bf16."""
    cfg = C.apply_overrides(
        C.base(),
        [
            f"model.num_layers={size.num_layers}",
            f"model.d_model={size.d_model}",
            f"model.d_ff={size.d_ff}",
            f"model.num_heads={size.num_heads}",
            f"model.d_k={size.d_k}",
            f"model.d_v={size.d_k}",
            f"data.vocab_size={size.vocab}",
            f"data.max_tokens={size.batch * max(size.src_len, size.tgt_len)}",
            "train.precision=bf16",
            "train.loss_chunk_tokens=null",
        ],
    )
    return M.training_memory(cfg).total


# ----------------------------------------------------------------------------------------------------------
# 1 and 5: training throughput, MFU, memory (with and without compile)


def compiled_ours(size: tt.Size) -> torch.nn.Module:
    """Our model with its training forward compiled the way ``train.compile`` does it (lit_module)."""
    model = tt.build_ours(size)
    model.features = torch.compile(model.features, dynamic=True)  # type: ignore[method-assign]
    return model


tt.BUILDERS.setdefault("ours_compiled", compiled_ours)


def train_part(check: Check, *, compiled: bool) -> dict[str, Any]:
    sizes = SMOKE_SIZES if check.smoke else GPU_SIZES
    name = "ours_compiled" if compiled else "ours"
    warmup, rounds, per_round = (1, 1, 2) if check.smoke else (5, 3, 10)
    peak = check.report["peak_flops_bf16"] or H200_PEAK
    out: dict[str, Any] = {"peak_flops": peak, "mfu_formula": "(6 x params x target tokens + attention) / s"}
    for label, size in sizes.items():
        if check.left() < (20 if compiled else 10) and not check.smoke:
            out[label] = {"skipped": "time budget"}
            continue
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(check.device)
        start = time.perf_counter()
        first = {}
        if compiled:  # the first step compiles: time it alone
            first_start = time.perf_counter()
            tt.measure(size, "bf16", [name], warmup=0, rounds=1, steps_per_round=1, device=check.device)
            first["compile_s"] = round(time.perf_counter() - first_start, 1)
        res = tt.measure(
            size, "bf16", [name], warmup=warmup, rounds=rounds, steps_per_round=per_round, device=check.device
        )[name]
        params = param_count(tt.build_ours(size))
        target_tokens = statistics_tokens(res)
        flops = 6.0 * params * target_tokens + attention_flops(size)
        row = {
            "params": params,
            "batch": f"{size.batch}x{size.tgt_len}",
            "tok_s": round(res.tok_s, 1),
            "steps_s": round(res.steps_s, 3),
            "mfu": round(res.steps_s * flops / peak, 4),
            "mfu_padded_matmul": round(res.steps_s * tt.train_flops_per_batch(size) / peak, 4),
            "memory_estimate_gb": round(estimate_for(size) / 1e9, 2),
            "seconds": round(time.perf_counter() - start, 1),
            **first,
        }
        if check.device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(check.device) / 1e9, 2)
        out[label] = row
    return out


def statistics_tokens(res: tt.Result) -> float:
    """Mean target tokens per step of the timed steps."""
    return sum(res.tokens) / max(1, res.steps)


# ----------------------------------------------------------------------------------------------------------
# 2: decoding


def hashed_sources(sentences: list[str], length: int, vocab: int) -> torch.Tensor:
    """(n, length) ids: each sentence's words hashed into [4, vocab), cut or repeated to length - 1, then
    EOS: random weights make the ids' meaning irrelevant, the one length makes the forced output length
    the same for every sentence on both decoders."""
    rows = []
    for text in sentences:
        ids = [4 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest()) % (vocab - 4)
               for w in text.split()] or [4]  # fmt: skip
        ids = (ids * (length // len(ids) + 1))[: length - 1]
        rows.append([*ids, ds.EOS])
    return torch.tensor(rows)  # (n, length)


def decode_part(check: Check) -> dict[str, Any]:
    dev = gpu_data.dev_prefix(check.data).with_suffix(".en")
    if not dev.is_file():
        return {"error": f"{dev} missing: run python bench/gpu_data.py first (or pass --data)"}
    n, src_len, max_len_b, batch = (16, 10, 6, 8) if check.smoke else (500, 32, 32, 100)
    size = ds.SIZES["tiny" if check.smoke else "base"]
    sentences = dev.read_text(encoding="utf-8").splitlines()[:n]
    src = hashed_sources(sentences, src_len, size["vocab"]).to(check.device)
    ours = ds.NoEOS(ds.build_ours(size)).to(check.device)
    hf = ds.build_hf(size).to(check.device) if importlib.util.find_spec("transformers") else None
    out_len = src_len + max_len_b  # ours: source length + max_len_b tokens, then the forced EOS
    steps = out_len + 1

    def run_ours() -> None:
        for i in range(0, n, batch):
            hyps = ds.beam_search(ours, src[i : i + batch], beam_size=4, alpha=0.6, max_len_b=max_len_b)
            assert all(len(h.tokens) == out_len for h in hyps), "ours must decode exactly out_len tokens"

    def run_hf() -> None:
        with torch.inference_mode():
            for i in range(0, n, batch):
                part = src[i : i + batch]
                got = hf.generate(
                    input_ids=part, attention_mask=torch.ones_like(part), num_beams=4, do_sample=False,
                    max_new_tokens=steps, min_new_tokens=steps, length_penalty=0.6, early_stopping=False,
                )  # fmt: skip
                assert got.size(1) == steps + 1, f"HF produced {got.size(1) - 1} tokens, expected {steps}"

    timed: dict[str, float] = {}
    for name, fn in (("ours", run_ours), ("hf", run_hf)) if hf is not None else (("ours", run_ours),):
        fn()  # warm-up: allocator, kernels, lazy imports
        sync(check.device)
        start = time.perf_counter()
        fn()
        sync(check.device)
        timed[name] = time.perf_counter() - start
    tokens = n * steps
    out = {
        "sentences": n,
        "tokens_per_sentence": steps,
        "beam": 4,
        "dims": dict(size),
        "ours_tok_s": round(tokens / timed["ours"], 1),
    }
    if hf is None:  # the project's dev install leaves transformers out; the GPU machine has it
        return {**out, "hf": "transformers is not installed here"}
    return {
        **out,
        "hf_tok_s": round(tokens / timed["hf"], 1),
        "speedup_vs_hf": round(timed["hf"] / timed["ours"], 2),
    }


# ----------------------------------------------------------------------------------------------------------
# 3: packing (children of this script)


def packing_size(device: torch.device) -> tuple[tt.Size, str]:
    """The tiny row in bf16 on a GPU; on CPU (smoke) a smaller model in fp32 (CPU bf16 steps take seconds)."""
    return (TINY_ROW, "bf16") if device.type == "cuda" else (SMOKE_SIZES["base"], "fp32")


def packing_child(args: argparse.Namespace) -> None:
    """One packed job: warm up, say ready, wait for the common start, train ``seconds``, print its tokens."""
    device = torch.device(args.device)
    size, precision = packing_size(device)
    torch.manual_seed(0)
    model = tt.build_ours(size).to(device).train()
    step = tt.make_step(model, precision, device)
    batches = tt.random_batches(size, 4, device)
    tokens = [int(b["tgt_out"].ne(tt.PAD).sum()) for b in batches]
    for b in batches:
        step(b)
    sync(device)
    Path(args.packing_child).write_text("ready")
    go = Path(args.packing_child).with_suffix(".go")
    while not go.is_file():
        time.sleep(0.01)
    start = float(go.read_text())
    while time.time() < start:
        time.sleep(0.001)
    done, count, end = 0, 0, start + args.seconds
    while time.time() < end:
        step(batches[count % 4])
        done += tokens[count % 4]
        count += 1
    sync(device)
    print(json.dumps({"tokens": done, "steps": count, "seconds": time.time() - start}))


def run_packed(check: Check, jobs: int, seconds: float, folder: Path) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    threads = 1 if check.smoke else max(1, cores // jobs)  # on shared CPU cores, 2 threads spin-wait
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = []
    for i in range(jobs):
        flag = folder / f"job{jobs}_{i}.ready"
        for stale in (flag, flag.with_suffix(".go")):  # a previous check's flags would start it at once
            stale.unlink(missing_ok=True)
        argv = [sys.executable, __file__, "--packing-child", str(flag), "--device", str(check.device)]
        argv += ["--seconds", str(seconds)]
        procs.append((flag, subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)))
    deadline = time.time() + 120
    while not all(f.is_file() for f, _ in procs):
        if time.time() > deadline or any(p.poll() not in (None, 0) for _, p in procs):
            for _, p in procs:
                p.kill()
            return {"error": "a packed job failed to start"}
        time.sleep(0.05)
    start = time.time() + 0.2
    for flag, _ in procs:
        write_atomic(flag.with_suffix(".go"), str(start))
    results = [json.loads(p.communicate(timeout=seconds + 120)[0].splitlines()[-1]) for _, p in procs]
    total = sum(r["tokens"] for r in results) / max(r["seconds"] for r in results)
    return {"jobs": jobs, "threads_each": threads, "total_tok_s": round(total, 1)}


def packing_part(check: Check) -> dict[str, Any]:
    levels, seconds = ((1, 2), 1.0) if check.smoke else ((1, 2, 4, 8), 5.0)
    folder = check.out / "packing"
    folder.mkdir(parents=True, exist_ok=True)
    size, precision = packing_size(check.device)
    out: dict[str, Any] = {
        "model": f"d_model {size.d_model}, N {size.num_layers}, {size.batch}x{size.tgt_len}"
    }
    out["precision"] = precision
    for jobs in levels:
        if check.left() < 20 and not check.smoke:
            out[str(jobs)] = {"skipped": "time budget"}
            continue
        out[str(jobs)] = run_packed(check, jobs, seconds, folder)
    one = out.get("1", {}).get("total_tok_s")
    for jobs in levels:
        row = out[str(jobs)]
        if one and "total_tok_s" in row:
            row["vs_one_job"] = round(row["total_tok_s"] / one, 2)
    return out


# ----------------------------------------------------------------------------------------------------------
# 4: a real run on real text


def smoke_config(check: Check, out: Path) -> C.RunConfig:
    """The small scale's base on Europarl + other years' news, dev newstest2013 (CPU smoke: a micro model
    on the first 1,500 Europarl pairs)."""
    from experiments.grids import grid as G

    cfg = G.load_grid("table3").config("base", "small")
    train = tuple(str(p) for p in gpu_data.train_prefixes(check.data))
    dev = str(gpu_data.dev_prefix(check.data))
    if check.smoke:
        cut = out / "text"
        cut.mkdir(parents=True, exist_ok=True)
        for prefix, name, lines in ((train[0], "train", 1500), (dev, "dev", 40)):
            for lang in gpu_data.LANGS:
                text = Path(f"{prefix}.{lang}").read_text(encoding="utf-8").splitlines()[:lines]
                (cut / f"{name}.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
        train, dev = (str(cut / "train"),), str(cut / "dev")
    data = replace(cfg.data, corpus="text", train=train, dev=dev, test=None, cache_dir=str(out / "cache"))
    overrides = [
        "train.max_steps=100000",
        "train.val_every_n_steps=100",
        "train.checkpoint_every_n_steps=100000",
        "train.wandb=false",
        "train.progress_bar=false",
        "eval.bleu_every_n_steps=null",
        "eval.max_sentences=500",
        "data.vocab_size=8000",
    ]
    if check.smoke:
        overrides += [
            "model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.d_k=8", "model.d_v=8",
            "data.vocab_size=300", "data.max_tokens=600", "optim.tokens_per_update=null",
            "optim.warmup_steps=10", "train.max_steps=20", "train.val_every_n_steps=10",
            "train.precision=fp32",
            "eval.beam_size=2", "eval.max_sentences=10", "eval.max_len_b=5", "train.num_threads=1",
        ]  # fmt: skip
    return C.apply_overrides(replace(cfg, data=data), overrides)


def time_limit(seconds: float) -> Any:
    """A Lightning callback that ends training after ``seconds`` of it (then the run evaluates dev)."""
    import lightning as L

    class TimeLimit(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if time.perf_counter() - self.start > seconds:
                trainer.should_stop = True

    return TimeLimit()


def smoke_part(check: Check) -> dict[str, Any]:
    if not gpu_data.dev_prefix(check.data).with_suffix(".en").is_file():
        return {"error": f"{check.data} has no newstest2013: run python bench/gpu_data.py first"}
    from experiments.runs import folder as RF
    from experiments.runs import run as R
    from experiments.runs.folder import RunInfo

    out = check.out / "smoke"
    with contextlib.suppress(FileNotFoundError):
        for p in sorted(out.rglob("*"), reverse=True):  # a fresh run every time
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    cfg = smoke_config(check, out)
    seconds = 600.0 if check.smoke else max(30.0, min(120.0, check.left() - 60))
    start = time.perf_counter()
    summary = R.train(cfg, out / "run", RunInfo("table3", "small", "base"), callbacks=[time_limit(seconds)])
    import csv

    with (out / "run" / RF.METRICS).open(newline="") as fh:
        dev = [float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")]
    return {
        "train_seconds_limit": seconds,
        "seconds": round(time.perf_counter() - start, 1),
        "steps": summary.get("train_steps"),
        "dev_loss": [round(x, 3) for x in dev],
        "dev_loss_fell": len(dev) >= 2 and dev[-1] < dev[0],
        "ppl_dev": summary.get("ppl_dev"),
        "bleu_dev": summary.get("bleu_dev"),
        "dev_sentences_decoded": cfg.eval.max_sentences,
    }


# ----------------------------------------------------------------------------------------------------------


def write_calibration_file(check: Check) -> None:
    """From parts 1 and 3 (GPU only): tokens/s by model size and the packing speed-up."""
    parts = check.report["parts"]
    points = [
        {"name": label, "params": row["params"], "tokens_per_s": row["tok_s"]}
        for label, row in parts.get("train", {}).items()
        if isinstance(row, dict) and "tok_s" in row
    ]
    packing = {
        int(k): v["vs_one_job"]
        for k, v in parts.get("packing", {}).items()
        if isinstance(v, dict) and "vs_one_job" in v
    }
    one = parts.get("packing", {}).get("1", {})
    if "total_tok_s" in one:
        points.append(
            {
                "name": "tiny",
                "params": param_count(tt.build_ours(TINY_ROW)),
                "tokens_per_s": one["total_tok_s"],
            }
        )
    if points:
        write_calibration(check.out / "gpu_calibration.json", check.report["device"], points, packing)


PARTS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "train": lambda c: train_part(c, compiled=False),
    "decode": decode_part,
    "packing": packing_part,
    "smoke": smoke_part,
    "compile": lambda c: (
        {"skipped": "cpu-smoke: inductor's CPU compile takes minutes; timed on a GPU"}
        if c.smoke
        else {"skipped": "time budget"}
        if c.left() < 45
        else train_part(c, compiled=True)
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every part for a few steps on CPU")
    parser.add_argument("--out-dir", default="results/gpu_check", help="gpu_check.json, gpu_calibration.json")
    parser.add_argument("--data", default=str(gpu_data.DATA_DIR), help="copied by bench/gpu_data.py")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for all parts (default 290)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--packing-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.packing_child:
        packing_child(args)
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-smoke to try every part on CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)
    check = Check(args)
    for part in args.parts.split(","):
        try:
            check.record(part, PARTS[part](check))
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others' figures
            check.record(part, {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})
    if not check.smoke:
        write_calibration_file(check)
    print(json.dumps(check.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
