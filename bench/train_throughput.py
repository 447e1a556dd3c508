"""Training throughput of our Transformer against torch.nn.Transformer and Hugging Face MarianMTModel.

Run: ``.venv/bin/python bench/train_throughput.py [--quick] [--sizes tiny,base] [--precisions fp32,bf16]``

The same configuration is trained three ways in one process, each a plain torch loop (forward,
label-smoothed cross-entropy ignoring PAD, backward, Adam(0.9, 0.98, 1e-9) step):

- ours: ``transformer_lit.model.Transformer``;
- torch_nn: ``torch.nn.Transformer`` (batch_first, post-LN, ReLU, as it comes) with a shared, scaled
  embedding, sinusoidal positions and the tied pre-softmax projection around it;
- hf_marian: ``transformers.MarianMTModel`` from a ``MarianConfig`` of the same dimensions (post-LN,
  sinusoidal positions, scaled and shared embeddings, ReLU; no download).

Batches are random tokens of a realistic shape, right-padded to varying lengths (so every model runs its
padding-mask path). The models take turns in rounds after warm-up, so load from other processes on a shared
machine spreads over all three. Prints a table of target tokens/s; the LAST line is one JSON object with
``ours_tok_s``, ``torch_nn_tok_s``, ``hf_marian_tok_s`` (paper-base, fp32) and the bf16 figures. On a GPU it
also prints the bf16 model-FLOPs utilisation of the base model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


def make_step(model: nn.Module, precision: str, device: torch.device) -> Callable[[dict[str, Tensor]], Tensor]:
    fused = device.type in ("cpu", "cuda")
    optim = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=fused)

    def step(batch: dict[str, Tensor]) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch["src"], batch["tgt_in"])  # (b, t, V)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), ignore_index=PAD, label_smoothing=0.1
            )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    size: Size, precision: str, names: list[str], *, warmup: int, rounds: int, steps_per_round: int, device
) -> dict[str, float]:
    """Target tokens/s of each model; the models take turns, steps_per_round steps at a time."""
    batches = random_batches(size, 4, device)
    tokens = [int(b["tgt_out"].ne(PAD).sum()) for b in batches]
    steps, elapsed, done = {}, dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    for name in names:
        torch.manual_seed(0)
        model = BUILDERS[name](size).to(device).train()
        steps[name] = make_step(model, precision, device)
        for i in range(warmup):
            steps[name](batches[i % len(batches)])
        sync(device)
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name](batches[done[name] % len(batches)])
                done[name] += 1
            sync(device)
            elapsed[name] += time.perf_counter() - start
    return {n: sum(tokens[i % len(tokens)] for i in range(done[n])) / elapsed[n] for n in names}


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


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    header = ["size", "precision", "ours tok/s", "torch.nn tok/s", "HF Marian tok/s", "ours/torch.nn", "ours/Marian"]
    lines = []
    for size, precision, r in rows:
        lines.append(
            [
                size,
                precision,
                f"{r['ours']:,.0f}",
                f"{r['torch_nn']:,.0f}",
                f"{r['hf_marian']:,.0f}",
                f"{r['ours'] / r['torch_nn']:.2f}x",
                f"{r['ours'] / r['hf_marian']:.2f}x",
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Training throughput (target tokens/s, higher is better)")
        for h in header:
            table.add_column(h, justify="left" if h in ("size", "precision") else "right")
        for line in lines:
            table.add_row(*line)
        Console(width=140).print(table)
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        for line in [header, *lines]:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: under 3 minutes on 2 CPU cores")
    parser.add_argument("--sizes", default="tiny,base", help="comma list of: tiny, base")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of: fp32, bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default by size)")
    parser.add_argument("--batch", type=int, default=None, help="sentences per batch (default by size)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = list(BUILDERS)
    on_cpu = device.type == "cpu"
    rows, result = [], {}
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        if args.batch:
            size = Size(**{**size.__dict__, "batch": args.batch})
        if not on_cpu and size_name == "base" and not args.batch:
            size = Size(**{**size.__dict__, "batch": 256, "src_len": 64, "tgt_len": 64})
        # (steps per round, rounds): tiny steps cost milliseconds, CPU base steps about a second
        if size_name == "tiny":
            per_round, rounds, warmup = (10, 3, 5) if args.quick else (50, 6, 10)
        elif on_cpu:
            per_round, rounds, warmup = (2, 3, 2) if args.quick else (5, 8, 3)
        else:
            per_round, rounds, warmup = (10, 3, 5) if args.quick else (50, 6, 10)
        if args.steps:
            per_round = max(1, args.steps // rounds)
        for precision in args.precisions.split(","):
            start = time.perf_counter()
            r = measure(
                size, precision, names, warmup=warmup, rounds=rounds, steps_per_round=per_round, device=device
            )
            print(
                f"{size_name} {precision}: {per_round * rounds} timed steps per model, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            rows.append((size_name, precision, r))
            suffix = "" if precision == "fp32" else f"_{precision}"
            if size_name == "base":
                for n in names:
                    result[f"{n}_tok_s{suffix}"] = round(r[n], 1)
                if not on_cpu and precision == "bf16":
                    peak = gpu_peak(device)
                    batch_tokens = size.batch * size.tgt_len
                    flops = {n: r[n] / batch_tokens * train_flops_per_batch(size) for n in names}
                    if peak:
                        for n in names:
                            result[f"{n}_mfu_bf16"] = round(flops[n] / peak, 4)
                        print(
                            "base bf16 model-FLOPs utilisation on "
                            f"{torch.cuda.get_device_name(device)} (peak {peak / 1e12:.0f} TFLOP/s): "
                            + ", ".join(f"{n} {flops[n] / peak:.1%}" for n in names)
                        )
    print_table(rows)
    for size_name, precision, r in rows:
        if precision == "bf16":
            fp32 = next((x for s, p, x in rows if s == size_name and p == "fp32"), None)
            if fp32:
                print(f"{size_name}: ours bf16/fp32 = {r['ours'] / fp32['ours']:.2f}x")
                if size_name == "base":
                    result["ours_bf16_over_fp32"] = round(r["ours"] / fp32["ours"], 3)
    result.update(device=str(device), threads=args.threads, quick=args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
