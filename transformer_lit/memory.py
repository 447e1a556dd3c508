"""GPU memory and checkpoint disk of a run, from its config alone (no torch, no model built).

The local launcher refuses a packing of several jobs on one GPU whose estimated memory exceeds the card,
and ``tlit grid plan`` shows memory and disk per run. Rough on purpose and erring high: it counts what a
training step keeps alive at its peak, not what the caching allocator happens to reserve.
``bench/gpu_check.py`` reports the measured peak (``torch.cuda.max_memory_allocated``) beside this estimate
for each configuration.

Training memory of one process (one device of a run):
- parameters in fp32 (the master weights; bf16 autocast keeps them fp32), their gradients in fp32, and
  Adam's two moments in fp32: 16 bytes per parameter;
- activations saved for the backward pass at ``data.max_tokens`` tokens per side: per token and layer, the
  sub-layer inputs, Q, K, V and the attention output in the compute precision (2 bytes in bf16, 4 in fp32),
  dropout masks (1 byte) and the fp32 LayerNorm inputs. Attention probabilities are not stored: SDPA's
  flash and memory-efficient kernels recompute them (``tests/test_gpu_speed.py`` checks we stay on them);
- the loss: the chunked cross-entropy holds ``train.loss_chunk_tokens`` x V fp32 logits and their
  gradient at a time plus the fp32 gradient of the output matrix; the plain loss holds all of them;
- a fixed overhead per process: CUDA context, cuBLAS workspaces, allocator slack.

Checkpoint disk: a Lightning checkpoint holds the fp32 weights and Adam's two moments (12 bytes per
parameter); a run keeps ``train.keep_checkpoints`` periodic ones (the paper averages the last 5 for base,
20 for big) plus ``last.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer_lit import config as C
from transformer_lit.params import count_parameters

GIB = 1024**3
PROCESS_OVERHEAD_BYTES = GIB
"""CUDA context (~0.5 GB on Hopper), cuBLAS/cuDNN workspaces and the caching allocator's slack."""
CHECKPOINT_BYTES_PER_PARAM = 12
"""fp32 weights + Adam's exp_avg and exp_avg_sq."""
TRAIN_BYTES_PER_PARAM = 16
"""fp32 weights, fp32 gradients and Adam's two fp32 moments."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process holds at its peak, by kind."""

    states: int
    """Weights, gradients and Adam moments."""
    activations: int
    loss: int
    overhead: int

    @property
    def total(self) -> int:
        return self.states + self.activations + self.loss + self.overhead


def _compute_bytes(cfg: C.RunConfig) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


def _attention_bytes(cfg: C.RunConfig) -> int:
    """Per token of one attention sub-layer: its input, Q, K, V, the attention output (also the input of
    W_O), the residual dropout mask and the fp32 LayerNorm input."""
    m, a = cfg.model, _compute_bytes(cfg)
    heads_k, heads_v = m.num_heads * m.d_k, m.num_heads * m.d_v
    return a * (m.d_model + 2 * heads_k + heads_v + 2 * heads_v) + m.d_model + 4 * m.d_model


def _feed_forward_bytes(cfg: C.RunConfig) -> int:
    """Per token of one feed-forward sub-layer: W_1's input, the ReLU output (W_2's input), the ReLU mask,
    the residual dropout mask and the fp32 LayerNorm input."""
    m, a = cfg.model, _compute_bytes(cfg)
    return a * (m.d_model + m.d_ff) + m.d_ff + m.d_model + 4 * m.d_model


def activation_bytes(cfg: C.RunConfig) -> int:
    """Saved activations of one micro-batch of ``data.max_tokens`` tokens per side."""
    m, tokens = cfg.model, cfg.data.max_tokens
    embed = (_compute_bytes(cfg) + 1) * m.d_model  # embeddings + position sum, dropout mask
    encoder = m.num_layers * (_attention_bytes(cfg) + _feed_forward_bytes(cfg))
    decoder = m.num_layers * (2 * _attention_bytes(cfg) + _feed_forward_bytes(cfg))
    return tokens * (2 * embed + encoder + decoder)


def loss_bytes(cfg: C.RunConfig) -> int:
    """The output projection and cross-entropy: fp32 logits and their gradient for the positions held at
    once, the fp32 gradient of the hidden states, and (chunked) the fp32 gradient of the output matrix."""
    tokens, vocab, d = cfg.data.max_tokens, cfg.data.vocab_size, cfg.model.d_model
    chunk = cfg.train.loss_chunk_tokens
    if chunk is None:
        return tokens * vocab * (_compute_bytes(cfg) + 4 + 4) + tokens * d * 4
    return min(chunk, tokens) * vocab * (4 + 4) + tokens * d * 4 + vocab * d * 4


def training_memory(cfg: C.RunConfig) -> MemoryEstimate:
    """Peak bytes of one training process of ``cfg`` on its device (see the module docstring)."""
    params = count_parameters(cfg.model, cfg.data.vocab_size)
    return MemoryEstimate(
        states=TRAIN_BYTES_PER_PARAM * params,
        activations=activation_bytes(cfg),
        loss=loss_bytes(cfg),
        overhead=PROCESS_OVERHEAD_BYTES,
    )


def checkpoint_bytes(cfg: C.RunConfig) -> int:
    """One checkpoint file: fp32 weights and Adam's two moments."""
    return CHECKPOINT_BYTES_PER_PARAM * count_parameters(cfg.model, cfg.data.vocab_size)


def checkpoint_disk(cfg: C.RunConfig) -> int:
    """All checkpoints a finished run keeps: ``train.keep_checkpoints`` periodic ones and ``last.ckpt``
    (older periodic checkpoints are deleted as new ones are written)."""
    return (cfg.train.keep_checkpoints + 1) * checkpoint_bytes(cfg)


def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style, decimal units as disks and GPU spec sheets use them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"
