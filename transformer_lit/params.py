"""Parameter counts computed from a ModelConfig, without building (or importing) the model.

Tables and grid planning use this, so it imports no torch. ``tests/test_params.py`` checks that it equals
``sum(p.numel() for p in build_model(cfg, V).parameters())`` for every Table 3 row at a tiny scale, and that
with a shared vocabulary of 41,000 subwords it lands within 3% of every params cell of the paper's Table 3.

Conventions (the paper states none of them; these are tensor2tensor's and fairseq's):
- every linear layer of attention and feed-forward has a bias; the pre-softmax projection has none;
- every LayerNorm has a gain and a bias; pre-LN adds one final LayerNorm to each stack;
- shared embeddings: one V x d_model matrix (Section 3.4); untied: three (source, target, output);
- learned positions (row E): one table of ``max_positions`` x d_model for each of encoder and decoder.
"""

from __future__ import annotations

from transformer_lit.config import ModelConfig


def linear_params(d_in: int, d_out: int, *, bias: bool = True) -> int:
    """Weights and bias of ``nn.Linear(d_in, d_out)``."""
    return d_in * d_out + (d_out if bias else 0)


def attention_params(d_model: int, num_heads: int, d_k: int, d_v: int) -> int:
    """W_Q, W_K (d_model -> h*d_k), W_V (d_model -> h*d_v) and W_O (h*d_v -> d_model), Section 3.2.2."""
    return (
        2 * linear_params(d_model, num_heads * d_k)
        + linear_params(d_model, num_heads * d_v)
        + linear_params(num_heads * d_v, d_model)
    )


def feed_forward_params(d_model: int, d_ff: int) -> int:
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (Section 3.3)."""
    return linear_params(d_model, d_ff) + linear_params(d_ff, d_model)


def layer_norm_params(d_model: int) -> int:
    """Gain and bias."""
    return 2 * d_model


def encoder_layer_params(cfg: ModelConfig) -> int:
    """Self-attention, feed-forward and two LayerNorms."""
    return (
        attention_params(cfg.d_model, cfg.num_heads, cfg.d_k, cfg.d_v)
        + feed_forward_params(cfg.d_model, cfg.d_ff)
        + 2 * layer_norm_params(cfg.d_model)
    )


def decoder_layer_params(cfg: ModelConfig) -> int:
    """Masked self-attention, encoder-decoder attention, feed-forward and three LayerNorms."""
    return (
        2 * attention_params(cfg.d_model, cfg.num_heads, cfg.d_k, cfg.d_v)
        + feed_forward_params(cfg.d_model, cfg.d_ff)
        + 3 * layer_norm_params(cfg.d_model)
    )


def embedding_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Token embeddings and pre-softmax projection (one shared matrix or three), plus learned positions."""
    matrices = 1 if cfg.share_embeddings else 3
    total = matrices * vocab_size * cfg.d_model
    if cfg.positional == "learned":
        total += 2 * cfg.max_positions * cfg.d_model
    return total


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Trainable parameters of ``build_model(cfg, vocab_size)``, computed arithmetically.

    Args:
        cfg: The model configuration.
        vocab_size: Size of the shared source/target vocabulary.

    Returns:
        The number of distinct trainable scalars (a shared matrix counts once).
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    final_norms = 2 * layer_norm_params(cfg.d_model) if cfg.norm_order == "pre" else 0
    return (
        cfg.num_layers * (encoder_layer_params(cfg) + decoder_layer_params(cfg))
        + embedding_params(cfg, vocab_size)
        + final_norms
    )
