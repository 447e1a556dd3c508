"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017), with every Table 3 knob.

Shape legend: b batch, s source length, t target length, V vocabulary, d_model model width, h heads.
Masks follow attention.py: ``src_pad_mask`` is bool (b, s), True at PAD; causal masking is internal to the
decoder.

Faithful to the paper: post-LayerNorm residual blocks (Section 3.1; pre-LN is a switch), embeddings scaled by
sqrt(d_model) and one matrix shared by source embedding, target embedding and pre-softmax projection
(Section 3.4), sinusoidal positions (Section 3.5; learned ones for row E), dropout on sub-layer outputs and
on embedding+position sums only (Section 5.4). Not stated by the paper, taken from tensor2tensor/fairseq:
Xavier-uniform linear weights, zero biases, embeddings ~ normal(0, d_model^-0.5) (so that after the
sqrt(d_model) scale they have unit variance), PAD row zero, no bias on the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from transformer_lit.attention import AttentionImpl, KVCache, MultiHeadCrossAttention, MultiHeadSelfAttention
from transformer_lit.layers import DecoderLayer, EncoderLayer, FeedForward, NormOrder
from transformer_lit.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding

if TYPE_CHECKING:
    from transformer_lit.config import ModelConfig

__all__ = ["DecoderCache", "Decoder", "Embeddings", "Encoder", "Transformer", "build_model"]


class Embeddings(nn.Module):
    """Dropout(Embedding(tokens) * sqrt(d_model) + positions) (Sections 3.4, 3.5 and 5.4).

    Args:
        token: Token embedding (possibly shared with the other side and with the output projection).
        positions: Sinusoidal or learned positions, called as ``positions(length, offset)``.
        dropout: P_drop on the sum.
    """

    def __init__(self, token: nn.Embedding, positions: nn.Module, dropout: float):
        super().__init__()
        self.token = token
        self.positions = positions
        self.scale = math.sqrt(token.embedding_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """tokens (b, n) at positions offset .. offset+n-1 -> (b, n, d_model)."""
        pe = self.positions(tokens.size(1), offset)  # (n, d_model)
        return self.dropout(torch.add(pe, self.token(tokens), alpha=self.scale))  # (b, n, d_model)

    def extra_repr(self) -> str:
        return f"scale=sqrt({self.token.embedding_dim})"


def _final_norm(d_model: int, norm_order: NormOrder, eps: float) -> nn.LayerNorm | None:
    """Pre-LN stacks end with a LayerNorm; post-LN ones already end normalised (no extra parameters)."""
    return nn.LayerNorm(d_model, eps=eps) if norm_order is NormOrder.PRE else None


class Encoder(nn.Module):
    """N identical encoder layers (Section 3.1) over embedded source tokens."""

    def __init__(
        self, *, num_layers: int, d_model: int, norm_order: NormOrder, layer_norm_eps: float, **layer_kw
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d_model, norm_order=norm_order, layer_norm_eps=layer_norm_eps, **layer_kw)
            for _ in range(num_layers)
        )
        self.final_norm = _final_norm(d_model, norm_order, layer_norm_eps)

    def forward(self, x: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """x (b, s, d_model) -> memory (b, s, d_model)."""
        for layer in self.layers:
            x = layer(x, src_pad_mask)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(nn.Module):
    """N identical decoder layers (Section 3.1) over embedded target tokens and the encoder memory."""

    def __init__(
        self, *, num_layers: int, d_model: int, norm_order: NormOrder, layer_norm_eps: float, **layer_kw
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d_model, norm_order=norm_order, layer_norm_eps=layer_norm_eps, **layer_kw)
            for _ in range(num_layers)
        )
        self.final_norm = _final_norm(d_model, norm_order, layer_norm_eps)

    def forward(self, x: Tensor, memory: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """Full recompute: x (b, t, d_model) -> (b, t, d_model)."""
        for layer in self.layers:
            x = layer(x, memory, src_pad_mask)
        return x if self.final_norm is None else self.final_norm(x)

    def step(self, x: Tensor, cache: DecoderCache) -> Tensor:
        """New positions x (b, n, d_model) with cached keys/values -> (b, n, d_model); fills the cache."""
        for layer, self_kv, memory_kv in zip(self.layers, cache.self_kv, cache.memory_kv, strict=True):
            x = layer.step(x, self_kv, memory_kv, cache.src_pad_mask)
        return x if self.final_norm is None else self.final_norm(x)


@dataclass
class DecoderCache:
    """State of incremental decoding for a batch of b rows (sentences, or sentences x beams).

    Attributes:
        self_kv: Per decoder layer, the growing self-attention keys/values.
        memory_kv: Per decoder layer, encoder-decoder keys (b, h, s, d_k) and values (b, h, s, d_v),
            projected once from the memory.
        src_pad_mask: (b, s), True at source PAD.
        length: Target positions decoded so far; the next token sits at position ``length``.
    """

    self_kv: list[KVCache]
    memory_kv: list[tuple[Tensor, Tensor]]
    src_pad_mask: Tensor
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (b',) in this order, in place; rows may repeat (beam expansion)."""
        self.reorder_beams(index)
        self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
        self.src_pad_mask = self.src_pad_mask.index_select(0, index)

    def reorder_beams(self, index: Tensor) -> None:
        """:meth:`reorder` for an ``index`` that maps every row to a row of the same sentence (beams of one
        sentence permuted): the memory keys/values and the mask, identical within a sentence, stay as they
        are, and only the decoded positions are copied."""
        for kv in self.self_kv:
            kv.reorder(index)

    @property
    def batch_size(self) -> int:
        return self.src_pad_mask.size(0)


class Transformer(nn.Module):
    """Encoder-decoder Transformer (Figure 1). Keyword arguments mirror ModelConfig's fields.

    Args:
        vocab_size: V, shared by source and target.
        pad_id: PAD token id: its embedding row starts at zero and the source mask hides it.
        num_layers: N, in the encoder and in the decoder.
        d_model: Model width.
        d_ff: Feed-forward inner width.
        num_heads: h.
        d_k: Query/key width per head (independent of h and d_model).
        d_v: Value width per head.
        dropout: P_drop.
        positional: ``"sinusoidal"`` or ``"learned"``.
        max_positions: Size of the learned tables (and initial size of the sinusoid cache).
        norm_order: ``"post"`` (the paper) or ``"pre"``.
        share_embeddings: One matrix for source/target embeddings and output projection; else three.
        layer_norm_eps: LayerNorm epsilon.
        init: ``"xavier"`` (every projection) or ``"fan_in"`` (residual-branch outputs: see ModelConfig).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        pad_id: int = 0,
        num_layers: int = 6,
        d_model: int = 512,
        d_ff: int = 2048,
        num_heads: int = 8,
        d_k: int = 64,
        d_v: int = 64,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        max_positions: int = 1024,
        norm_order: NormOrder | str = NormOrder.POST,
        share_embeddings: bool = True,
        layer_norm_eps: float = 1e-6,
        init: str = "xavier",
    ):
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, vocab_size={vocab_size}), got {pad_id!r}")
        if positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional must be one of sinusoidal, learned, got {positional!r}")
        if init not in ("xavier", "fan_in"):
            raise ValueError(f"init must be one of xavier, fan_in, got {init!r}")
        self.vocab_size, self.pad_id, self.d_model = vocab_size, pad_id, d_model
        self.num_layers, self.positional, self.share_embeddings = num_layers, positional, share_embeddings
        self.norm_order = NormOrder(norm_order)

        def positions() -> nn.Module:
            if positional == "learned":
                return LearnedPositionalEmbedding(d_model, max_positions=max_positions)
            return SinusoidalPositionalEncoding(d_model, initial_length=max_positions)

        src_token = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        tgt_token = src_token if share_embeddings else nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.src_embed = Embeddings(src_token, positions(), dropout)
        self.tgt_embed = Embeddings(tgt_token, positions(), dropout)
        stack_kw = dict(
            num_layers=num_layers, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_k=d_k, d_v=d_v,
            dropout=dropout, norm_order=self.norm_order, layer_norm_eps=layer_norm_eps,
        )  # fmt: skip
        self.encoder = Encoder(**stack_kw)
        self.decoder = Decoder(**stack_kw)
        self.output_proj = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_embeddings()
        if init == "fan_in":
            self.reset_branch_outputs()
        if share_embeddings:
            self.output_proj.weight = src_token.weight  # one Parameter, three uses (Section 3.4)

    def reset_embeddings(self) -> None:
        """normal(0, d_model^-0.5) for token tables and an untied output projection; PAD rows zero."""
        for emb in {id(m): m for m in (self.src_embed.token, self.tgt_embed.token)}.values():
            nn.init.normal_(emb.weight, mean=0.0, std=self.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()
        if not self.share_embeddings:
            nn.init.normal_(self.output_proj.weight, mean=0.0, std=self.d_model**-0.5)

    def reset_branch_outputs(self) -> None:
        """U(+-1/sqrt(fan_in)) on the projections that end a residual branch: W_O, W_1, W_2.

        Smaller branch outputs leave the residual path dominant at the start, which is what lets a
        post-LN stack of 6 narrow layers train at all in a short budget. Biases stay zero.
        """
        for module in self.modules():
            if isinstance(module, FeedForward):
                linears = (module.w_1, module.w_2)
            elif isinstance(module, (MultiHeadSelfAttention, MultiHeadCrossAttention)):
                linears = (module.w_o,)
            else:
                continue
            for lin in linears:
                bound = lin.in_features**-0.5
                nn.init.uniform_(lin.weight, -bound, bound)

    # ------------------------------------------------------------------------------------------------------
    # Training and full recompute

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (b, s) -> memory (b, s, d_model), src_pad_mask (b, s) True at PAD."""
        src_pad_mask = src.eq(self.pad_id)  # (b, s)
        memory = self.encoder(self.src_embed(src), src_pad_mask)  # (b, s, d_model)
        return memory, src_pad_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad_mask: Tensor) -> Tensor:
        """tgt_in (b, t), memory (b, s, d_model), src_pad_mask (b, s) -> logits (b, t, V)."""
        hidden = self.decoder(self.tgt_embed(tgt_in), memory, src_pad_mask)  # (b, t, d_model)
        return self.output_proj(hidden)  # (b, t, V)

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (b, s), tgt_in (b, t) -> decoder outputs (b, t, d_model) before the output projection.

        The training loss projects them itself, a chunk of positions at a time (``loss.py``), so that the
        full (b, t, V) logits never exist.
        """
        memory, src_pad_mask = self.encode(src)  # (b, s, d_model), (b, s)
        return self.decoder(self.tgt_embed(tgt_in), memory, src_pad_mask)  # (b, t, d_model)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (b, s), tgt_in (b, t) -> logits (b, t, V) for the next token at every target position."""
        return self.output_proj(self.features(src, tgt_in))  # (b, t, V)

    # ------------------------------------------------------------------------------------------------------
    # Incremental decoding

    def init_cache(self, memory: Tensor, src_pad_mask: Tensor, *, capacity: int = 64) -> DecoderCache:
        """Project the memory into each decoder layer's encoder-decoder keys/values once per sentence.

        ``capacity``: target positions the self-attention caches hold before they must grow (a search that
        knows its longest output passes it, so no step reallocates).
        """
        memory_kv = [layer.cross_attn.project_memory(memory) for layer in self.decoder.layers]
        self_kv = [KVCache(capacity=capacity) for _ in self.decoder.layers]
        return DecoderCache(self_kv=self_kv, memory_kv=memory_kv, src_pad_mask=src_pad_mask)

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """tokens (b,) at position ``cache.length`` -> next-token logits (b, V); appends to the cache."""
        x = self.tgt_embed(tokens[:, None], offset=cache.length)  # (b, 1, d_model)
        hidden = self.decoder.step(x, cache)  # (b, 1, d_model)
        cache.length += 1
        return self.output_proj(hidden[:, 0])  # (b, V)

    # ------------------------------------------------------------------------------------------------------

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch every attention module between SDPA (``"sdpa"``) and the naive ``"reference"`` (tests)."""
        for module in self.modules():
            if isinstance(module, MultiHeadSelfAttention | MultiHeadCrossAttention):
                module.impl = impl

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, pad_id={self.pad_id}, d_model={self.d_model}, "
            f"num_layers={self.num_layers}, positional={self.positional}, "
            f"norm_order={self.norm_order.value}, share_embeddings={self.share_embeddings}"
        )


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int = 0) -> Transformer:
    """The only reader of ModelConfig: turns its fields into Transformer's keyword arguments."""
    return Transformer(
        vocab_size=vocab_size,
        pad_id=pad_id,
        num_layers=cfg.num_layers,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        num_heads=cfg.num_heads,
        d_k=cfg.d_k,
        d_v=cfg.d_v,
        dropout=cfg.dropout,
        positional=cfg.positional,
        max_positions=cfg.max_positions,
        norm_order=cfg.norm_order,
        share_embeddings=cfg.share_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        init=cfg.init,
    )
