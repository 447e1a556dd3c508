"""Encoder and decoder layers (Section 3.1): attention and feed-forward sub-layers with residual blocks.

Dropout sits only on each sub-layer's output, before the residual add (Section 5.4, "Residual Dropout");
there is none inside attention or inside the feed-forward network.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from torch import Tensor, nn

from transformer_lit.attention import KVCache, MultiHeadCrossAttention, MultiHeadSelfAttention


class NormOrder(str, enum.Enum):
    """Where LayerNorm sits in each residual block.

    POST: ``LayerNorm(x + Dropout(Sublayer(x)))``, the paper: "the output of each sub-layer is
        LayerNorm(x + Sublayer(x))" (Section 3.1), with dropout applied "to the output of each sub-layer,
        before it is added to the sub-layer input and normalized" (Section 5.4).
    PRE: ``x + Dropout(Sublayer(LayerNorm(x)))`` with one final LayerNorm on each stack's output
        (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; tensor2tensor's later
        default). Not the paper; offered because it trains without warm-up tuning.
    """

    POST = "post"
    PRE = "pre"


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position alike (Section 3.3)."""

    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        for lin in (self.w_1, self.w_2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d_model) -> (b, n, d_model)."""
        return self.w_2(self.w_1(x).relu_())


class _ResidualLayer(nn.Module):
    """Shared residual wiring: one (LayerNorm, Dropout) pair per sub-layer, placed by ``norm_order``."""

    def __init__(
        self, *, d_model: int, num_sublayers: int, dropout: float, norm_order: NormOrder | str, eps: float
    ):
        super().__init__()
        self.norm_order = NormOrder(norm_order)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model, eps=eps) for _ in range(num_sublayers))
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(num_sublayers))

    def _residual(self, i: int, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """Sub-layer i around x: post ``LN(x + Drop(F(x)))`` or pre ``x + Drop(F(LN(x)))``."""
        if self.norm_order is NormOrder.POST:
            return self.norms[i](x + self.dropouts[i](sublayer(x)))
        return x + self.dropouts[i](sublayer(self.norms[i](x)))


class EncoderLayer(_ResidualLayer):
    """Self-attention then feed-forward, each in a residual block (Section 3.1, encoder)."""

    def __init__(
        self,
        *,
        d_model: int,
        d_ff: int,
        num_heads: int,
        d_k: int,
        d_v: int,
        dropout: float,
        norm_order: NormOrder | str = NormOrder.POST,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__(
            d_model=d_model, num_sublayers=2, dropout=dropout, norm_order=norm_order, eps=layer_norm_eps
        )
        self.self_attn = MultiHeadSelfAttention(d_model=d_model, num_heads=num_heads, d_k=d_k, d_v=d_v)
        self.feed_forward = FeedForward(d_model=d_model, d_ff=d_ff)

    def forward(self, x: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """x (b, s, d_model), src_pad_mask (b, s) True at PAD -> (b, s, d_model)."""
        x = self._residual(0, x, lambda y: self.self_attn(y, key_padding_mask=src_pad_mask))
        return self._residual(1, x, self.feed_forward)


class DecoderLayer(_ResidualLayer):
    """Masked self-attention, encoder-decoder attention, feed-forward (Section 3.1, decoder)."""

    def __init__(
        self,
        *,
        d_model: int,
        d_ff: int,
        num_heads: int,
        d_k: int,
        d_v: int,
        dropout: float,
        norm_order: NormOrder | str = NormOrder.POST,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__(
            d_model=d_model, num_sublayers=3, dropout=dropout, norm_order=norm_order, eps=layer_norm_eps
        )
        self.self_attn = MultiHeadSelfAttention(d_model=d_model, num_heads=num_heads, d_k=d_k, d_v=d_v)
        self.cross_attn = MultiHeadCrossAttention(d_model=d_model, num_heads=num_heads, d_k=d_k, d_v=d_v)
        self.feed_forward = FeedForward(d_model=d_model, d_ff=d_ff)

    def forward(self, x: Tensor, memory: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """x (b, t, d_model), memory (b, s, d_model), src_pad_mask (b, s) -> (b, t, d_model)."""
        x = self._residual(0, x, lambda y: self.self_attn(y, causal=True))
        x = self._residual(1, x, lambda y: self.cross_attn(y, memory, key_padding_mask=src_pad_mask))
        return self._residual(2, x, self.feed_forward)

    def step(
        self, x: Tensor, self_cache: KVCache, memory_kv: tuple[Tensor, Tensor], src_pad_mask: Tensor | None
    ) -> Tensor:
        """Incremental decoding: new positions x (b, n, d_model) and cached keys/values -> (b, n, d_model)."""
        x = self._residual(0, x, lambda y: self.self_attn.step(y, self_cache))
        x = self._residual(1, x, lambda y: self.cross_attn.attend_memory(y, *memory_kv, src_pad_mask))
        return self._residual(2, x, self.feed_forward)
