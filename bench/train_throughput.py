"""Training throughput of our Transformer against torch.nn.Transformer and Hugging Face MarianMTModel.

Run: ``.venv/bin/python bench/train_throughput.py [--quick] [--sizes tiny,base] [--precisions fp32,bf16]``
(``--quick``: about 2 minutes on 2 cores; the full run times 30 base steps per model and precision on a CPU).

The same configuration is trained three ways in one process, each a plain torch loop (forward,
label-smoothed cross-entropy ignoring PAD, backward, Adam(0.9, 0.98, 1e-9) step, fused where available):

- ours: ``transformer_lit.model.Transformer``;
- torch_nn: ``torch.nn.Transformer`` (batch_first, post-LN, ReLU, its own code paths as they come) with a
  shared, scaled embedding, sinusoidal positions and the tied pre-softmax projection around it; its
  attention-weight and FFN-inner dropout are set to 0 so that it does the paper's (and our) work;
- hf_marian: ``transformers.MarianMTModel`` from a ``MarianConfig`` of the same dimensions (post-LN,
  sinusoidal positions, scaled and shared embeddings, ReLU, no attention/activation dropout; no download).

Sizes: tiny (d_model 64, N 2, vocab 1000, 32 x 20 tokens) and paper-base (d_model 512, N 6, d_ff 2048, h 8,
vocab 37000, 32 x 30 tokens on a CPU, 256 x 64 on a GPU). Batches are random tokens right-padded to varying
lengths, so every model runs its padding-mask path. After warm-up the models take turns, so load from other
processes spreads over all three; tokens/s is the median over timed steps (robust to such load), and a
second table gives tokens per process-CPU-second. Prints the tables; the LAST line is one JSON object with
``ours_tok_s``, ``torch_nn_tok_s``, ``hf_marian_tok_s`` (paper-base, fp32), the same with ``_bf16``, and
on a GPU the bf16 model-FLOPs utilisation of the base model (``*_mfu_bf16``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_lit.model import Transformer  # noqa: E402
from transformer_lit.positional import sinusoid_table  # noqa: E402

PAD, BOS = 0, 2
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


@dataclass(frozen=True)
class Size:
    name: str
    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    vocab: int
    batch: int
    src_len: int
    tgt_len: int

    @property
    def d_k(self) -> int:
        return self.d_model // self.num_heads


SIZES = {
    "tiny": Size("tiny", 2, 64, 256, 4, 1000, 32, 20, 20),
    "base": Size("base", 6, 512, 2048, 8, 37000, 32, 30, 30),
}


# ----------------------------------------------------------------------------------------------------------
# The two peers, each returning logits (b, t, V) from (src, tgt_in)


class TorchNNModel(nn.Module):
    """torch.nn.Transformer with the paper's embeddings around it (shared, scaled, sinusoids, tied output)."""

    def __init__(self, size: Size, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=size.d_model**-0.5)
        self.register_buffer("pe", sinusoid_table(1024, size.d_model), persistent=False)
        self.scale = math.sqrt(size.d_model)
        self.dropout = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model=size.d_model,
            nhead=size.num_heads,
            num_encoder_layers=size.num_layers,
            num_decoder_layers=size.num_layers,
            dim_feedforward=size.d_ff,
            dropout=dropout,
            batch_first=True,
            norm_first=False,
        )
        # The paper (and ours) has dropout only on sub-layer outputs and embedding sums; nn.Transformer's
        # `dropout` also drops attention weights and the FFN's inner activations. Switch those two off so
        # that the peer does the same work as ours (less work for the peer, never more).
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.dropout.p = 0.0  # inside the FFN: linear2(dropout(relu(linear1(x))))
            for attn in (getattr(layer, "self_attn", None), getattr(layer, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = 0.0

    def _embed(self, tokens: Tensor) -> Tensor:
        return self.dropout(self.embed(tokens) * self.scale + self.pe[: tokens.size(1)])  # (b, n, d_model)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        src_pad = src.eq(PAD)  # (b, s)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)  # (t, t)
        hidden = self.transformer(
            self._embed(src),
            self._embed(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=src_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )  # (b, t, d_model)
        return F.linear(hidden, self.embed.weight)  # (b, t, V)


class MarianModel(nn.Module):
    """transformers.MarianMTModel built from a config of the same dimensions (no download)."""

    def __init__(self, size: Size, dropout: float = 0.1):
        super().__init__()
        from transformers import MarianConfig, MarianMTModel

        cfg = MarianConfig(
            vocab_size=size.vocab,
            decoder_vocab_size=size.vocab,
            d_model=size.d_model,
            encoder_layers=size.num_layers,
            decoder_layers=size.num_layers,
            encoder_attention_heads=size.num_heads,
            decoder_attention_heads=size.num_heads,
            encoder_ffn_dim=size.d_ff,
            decoder_ffn_dim=size.d_ff,
            activation_function="relu",
            dropout=dropout,
            attention_dropout=0.0,
            activation_dropout=0.0,
            scale_embedding=True,
            share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True,
            max_position_embeddings=1024,
            pad_token_id=PAD,
            decoder_start_token_id=BOS,
            eos_token_id=3,
        )
        self.marian = MarianMTModel(cfg)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        out = self.marian(input_ids=src, attention_mask=src.ne(PAD).long(), decoder_input_ids=tgt_in)
        return out.logits  # (b, t, V)


def build_ours(size: Size) -> nn.Module:
    return Transformer(
        vocab_size=size.vocab,
        num_layers=size.num_layers,
        d_model=size.d_model,
        d_ff=size.d_ff,
        num_heads=size.num_heads,
        d_k=size.d_k,
        d_v=size.d_k,
        dropout=0.1,
    )


BUILDERS: dict[str, Callable[[Size], nn.Module]] = {
    "ours": build_ours,
    "torch_nn": TorchNNModel,
    "hf_marian": MarianModel,
}


# ----------------------------------------------------------------------------------------------------------
# Data, one training step, timing


def random_batches(size: Size, count: int, device: torch.device, seed: int = 0) -> list[dict[str, Tensor]]:
    """Random token batches, right-padded: lengths uniform in [0.6, 1] x the maximum, like bucketed data."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        src = torch.randint(4, size.vocab, (size.batch, size.src_len), generator=gen)
        tgt = torch.randint(4, size.vocab, (size.batch, size.tgt_len), generator=gen)
        src_lens = torch.randint(int(0.6 * size.src_len), size.src_len + 1, (size.batch,), generator=gen)
        tgt_lens = torch.randint(int(0.6 * size.tgt_len), size.tgt_len + 1, (size.batch,), generator=gen)
        src_lens[0], tgt_lens[0] = size.src_len, size.tgt_len  # the longest row sets the padded shape
        src[torch.arange(size.src_len)[None] >= src_lens[:, None]] = PAD
        tgt_out = tgt.masked_fill(torch.arange(size.tgt_len)[None] >= tgt_lens[:, None], PAD)
        tgt_in = torch.cat([torch.full((size.batch, 1), BOS), tgt_out[:, :-1]], dim=1)  # (b, t)
        batches.append({"src": src.to(device), "tgt_in": tgt_in.to(device), "tgt_out": tgt_out.to(device)})
    return batches


def make_step(
    model: nn.Module, precision: str, device: torch.device
) -> Callable[[dict[str, Tensor]], Tensor]:
    fused = device.type in ("cpu", "cuda")
    optim = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=fused)

    def step(batch: dict[str, Tensor]) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch["src"], batch["tgt_in"])  # (b, t, V)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(),
                batch["tgt_out"].flatten(),
                ignore_index=PAD,
                label_smoothing=0.1,
            )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Result:
    """One model's timed samples (a step on CPU, a round of steps on GPU): tokens, wall and CPU seconds."""

    tokens: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def tok_s(self) -> float:
        """Median over samples: robust to other processes stealing the cores for a while."""
        return statistics.median(t / w for t, w in zip(self.tokens, self.wall, strict=True))

    @property
    def tok_s_mean(self) -> float:
        return sum(self.tokens) / sum(self.wall)

    @property
    def tok_cpu_s(self) -> float:
        return sum(self.tokens) / sum(self.cpu)

    @property
    def steps_s(self) -> float:
        return self.steps / sum(self.wall)


def measure(
    size: Size,
    precision: str,
    names: list[str],
    *,
    warmup: int,
    rounds: int,
    steps_per_round: int,
    device: torch.device,
    budget_s: float | None = None,
) -> dict[str, Result]:
    """Time each model; after warm-up they take turns, ``steps_per_round`` steps at a time.

    Taking turns spreads the load of other processes over all models. With ``budget_s``, no new round
    starts once the timed steps have used that many seconds (at least one round runs).
    """
    batches = random_batches(size, 4, device)
    tokens = [int(b["tgt_out"].ne(PAD).sum()) for b in batches]
    steps, results = {}, {name: Result() for name in names}
    for name in names:
        torch.manual_seed(0)
        steps[name] = make_step(BUILDERS[name](size).to(device).train(), precision, device)
    for i in range(warmup):
        for name in names:
            steps[name](batches[i % len(batches)])
    if warmup:  # on CPU the first model's second step ever runs ~1.5x slow (whichever model is first)
        steps[names[0]](batches[0])
    sync(device)
    per_step = device.type == "cpu"  # on a GPU, time whole rounds so that steps overlap with launches
    start = time.perf_counter()
    for round_ in range(rounds):
        if round_ and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        for name in names:
            r = results[name]
            wall, cpu, count = time.perf_counter(), time.process_time(), 0
            for _ in range(steps_per_round):
                i = r.steps % len(batches)
                steps[name](batches[i])
                r.steps += 1
                count += tokens[i]
                if per_step:
                    r.tokens.append(count)
                    r.wall.append(time.perf_counter() - wall)
                    r.cpu.append(time.process_time() - cpu)
                    wall, cpu, count = time.perf_counter(), time.process_time(), 0
            if not per_step:
                sync(device)
                r.tokens.append(count)
                r.wall.append(time.perf_counter() - wall)
                r.cpu.append(time.process_time() - cpu)
    return results


# ----------------------------------------------------------------------------------------------------------
# Model FLOPs (GPU utilisation)


def train_flops_per_batch(size: Size) -> float:
    """Matmul FLOPs of forward+backward (3x forward) for one padded batch of our base model."""
    b, s, t, d, f, v = size.batch, size.src_len, size.tgt_len, size.d_model, size.d_ff, size.vocab
    hd = size.num_heads * size.d_k
    enc = 2 * s * (3 * d * hd + hd * d + 2 * d * f) + 2 * 2 * s * s * hd
    dec_self = 2 * t * (3 * d * hd + hd * d) + 2 * 2 * t * t * hd
    dec_cross = 2 * t * (d * hd + hd * d) + 2 * s * 2 * d * hd + 2 * 2 * t * s * hd
    dec = dec_self + dec_cross + 2 * t * 2 * d * f
    return 3.0 * b * (size.num_layers * (enc + dec) + 2 * t * d * v)


def gpu_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[tuple[str, str, dict[str, float]]]) -> None:
    """rows: (size, precision, {model: tokens per second}); rich when installed, plain text otherwise."""
    header = ["size", "precision", "ours", "torch.nn", "HF Marian", "ours/torch.nn", "ours/Marian"]
    lines = [
        [size, precision, *(f"{r[n]:,.0f}" for n in BUILDERS)]
        + [f"{r['ours'] / r['torch_nn']:.2f}x", f"{r['ours'] / r['hf_marian']:.2f}x"]
        for size, precision, r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        for line in [header, *lines]:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in ("size", "precision") else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=120).print(table)


def schedule(size_name: str, *, quick: bool, on_cpu: bool) -> tuple[int, int, int, float | None]:
    """(warm-up steps, rounds, steps per round, time budget of the timed steps in seconds) per model set.

    A CPU base step costs about 2 s in fp32 on 2 idle cores (~370 GFLOP) and 5-8 s on a loaded one, so
    --quick times one base step per model (a rough figure); tiny steps cost milliseconds.
    """
    if size_name == "tiny":
        return (5, 4, 10, 5.0) if quick else (20, 6, 50, None)
    if on_cpu:
        return (1, 1, 1, None) if quick else (2, 10, 3, None)
    return (5, 3, 10, None) if quick else (20, 6, 50, None)


def default_threads() -> int:
    """All cores on an idle machine. When the load average already exceeds the core count, one thread:
    OpenMP threads that share cores with other busy processes spin-wait, and a 2-thread step then costs
    several times a 1-thread step (measured here: 13-26 s against 5-9 s for a CPU base step)."""
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] >= cores:
        print(f"load average {os.getloadavg()[0]:.1f} >= {cores} cores: timing with 1 thread (see --threads)")
        return 1
    return cores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: under 3 minutes on 2 idle CPU cores")
    parser.add_argument("--sizes", default="tiny,base", help="comma list of: tiny, base")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of: fp32, bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: all cores, or 1 when other processes already keep them busy)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default by size)")
    parser.add_argument("--batch", type=int, default=None, help="sentences per batch (default by size)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        sys.exit("train_throughput.py compares with HF transformers: install the bench extra (make bench)")

    warnings.filterwarnings("ignore")
    if args.threads is None:
        args.threads = default_threads()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    names = list(BUILDERS)
    load_before = os.getloadavg()[0]
    start_all = time.perf_counter()
    rows, cpu_rows, result = [], [], {}
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        if not on_cpu and size_name == "base":  # a GPU needs a paper-like batch (~16k tokens) to be busy
            size = Size(**{**size.__dict__, "batch": 256, "src_len": 64, "tgt_len": 64})
        if args.batch:
            size = Size(**{**size.__dict__, "batch": args.batch})
        warmup, rounds, per_round, budget = schedule(size_name, quick=args.quick, on_cpu=on_cpu)
        if args.steps:
            per_round, budget = max(1, args.steps // rounds), None
        for precision in args.precisions.split(","):
            start = time.perf_counter()
            res = measure(
                size,
                precision,
                names,
                warmup=warmup,
                rounds=rounds,
                steps_per_round=per_round,
                device=device,
                budget_s=budget,
            )
            print(
                f"{size_name} {precision}: {res['ours'].steps} timed steps per model, "
                f"batch {size.batch}x{size.tgt_len}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            rows.append((size_name, precision, {n: res[n].tok_s for n in names}))
            cpu_rows.append((size_name, precision, {n: res[n].tok_cpu_s for n in names}))
            if size_name != "base":
                continue
            suffix = "" if precision == "fp32" else f"_{precision}"
            for n in names:
                result[f"{n}_tok_s{suffix}"] = round(res[n].tok_s, 1)
                result[f"{n}_tok_s_mean{suffix}"] = round(res[n].tok_s_mean, 1)
                if on_cpu:
                    result[f"{n}_tok_cpu_s{suffix}"] = round(res[n].tok_cpu_s, 1)
            if not on_cpu and precision == "bf16":
                report_mfu(size, res, device, result)
    print_table("Training throughput: target tokens per second (median of timed steps, wall clock)", rows)
    if on_cpu:
        print_table("Target tokens per process-CPU-second (less sensitive to other processes)", cpu_rows)
    for size_name, precision, r in rows:
        fp32 = next((x for s, p, x in rows if s == size_name and p == "fp32"), None)
        if precision == "bf16" and fp32:
            print(f"{size_name}: ours bf16/fp32 = {r['ours'] / fp32['ours']:.2f}x")
            if size_name == "base":
                result["ours_bf16_over_fp32"] = round(r["ours"] / fp32["ours"], 3)
    load_after = os.getloadavg()[0]
    print(
        f"load average {load_before:.1f} before, {load_after:.1f} after; "
        f"total {time.perf_counter() - start_all:.0f} s"
    )
    result.update(device=str(device), threads=args.threads, quick=args.quick, load_avg=round(load_after, 1))
    print(json.dumps(result))


def report_mfu(size: Size, res: dict[str, Result], device: torch.device, result: dict) -> None:
    """Model-FLOPs utilisation in bf16: matmul FLOPs of the padded batches per second over the GPU's peak."""
    peak = gpu_peak(device)
    name = torch.cuda.get_device_name(device)
    if peak is None:
        print(f"no bf16 peak known for {name}; MFU not reported")
        return
    flops = train_flops_per_batch(size)
    mfu = {n: res[n].steps_s * flops / peak for n in res}
    for n, value in mfu.items():
        result[f"{n}_mfu_bf16"] = round(value, 4)
    print(
        f"base bf16 model-FLOPs utilisation on {name} (peak {peak / 1e12:.0f} TFLOP/s, "
        f"{flops / 1e12:.2f} TFLOP per step): " + ", ".join(f"{n} {v:.1%}" for n, v in mfu.items())
    )


if __name__ == "__main__":
    main()
