"""Multi-head attention (Section 3.2) with h, d_k and d_v independent of each other and of d_model.

Shape legend: b batch, s source (key/value) length, t target (query) length, h heads, d_k query/key width
per head, d_v value width per head, L cached length during incremental decoding.

Mask convention (the only one in the project):
- ``key_padding_mask``: bool (b, s), True at PAD positions, which no query may attend to.
- causal masking (decoder self-attention, Section 3.2.3) is a flag, ``causal=True``: the t queries are the
  last t of the s key positions, and each sees only keys at or before its own position (t == s in a full
  recompute; one new query in cached decoding sees every cached key, so that needs no mask at all).
A query row whose keys are all masked returns zeros (never NaN), in the fast path and in the reference.

The fast path is ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which accepts values whose
width d_v differs from d_k and scales by 1/sqrt(d_k) (Section 3.2.1); with no padding mask and t == s it
runs with ``is_causal=True`` and no mask tensor. :func:`reference_attention` is the explicit
softmax(QK^T / sqrt(d_k)) V, kept for the tests, and also taken for bf16 on CPU, where it is faster than
SDPA's CPU kernel. There is no dropout inside attention: the model applies dropout only to sub-layer
outputs and to embedding+position sums (Section 5.4).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["sdpa", "reference"]


def future_mask(t: int, s: int, device: torch.device) -> Tensor:
    """(t, s) bool, True where key j lies after query i, the t queries being the last t of s positions."""
    return torch.ones(t, s, dtype=torch.bool, device=device).triu(s - t + 1)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """Scaled dot-product attention written out, softmax(Q K^T / sqrt(d_k)) V (Section 3.2.1).

    The tests' reference for SDPA, and the faster path for bf16 on CPU (see :func:`attend`).

    Args:
        q: Queries (b, h, t, d_k).
        k: Keys (b, h, s, d_k).
        v: Values (b, h, s, d_v).
        key_padding_mask: Bool (b, s), True at keys to ignore.
        causal: Mask keys after each query's position (query i sees keys 0 .. s - t + i).

    Returns:
        (b, h, t, d_v); rows with no visible key are zero.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (b, h, t, s)
    if key_padding_mask is not None:
        scores.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))  # (b, 1, 1, s) broadcast
    if causal:
        scores.masked_fill_(future_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    weights = scores.softmax(dim=-1)  # (b, h, t, s)
    if key_padding_mask is not None:
        weights = weights.nan_to_num(0.0)  # fully masked rows: 0/0 -> 0, as SDPA
    return torch.matmul(weights.to(v.dtype), v)  # (b, h, t, d_v)


def _prefer_explicit(q: Tensor) -> bool:
    """SDPA's CPU kernel is 2-5x slower than explicit matmuls in bf16/fp16 for training shapes (torch 2.13,
    (32, 8, 30, 64) fwd+bwd: 66 ms vs 20 ms; still slower at length 512); in fp32 and on GPUs SDPA wins."""
    return q.device.type == "cpu" and (q.dtype in (torch.bfloat16, torch.float16))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    impl: AttentionImpl = "sdpa",
) -> Tensor:
    """Scaled dot-product attention, through SDPA (the fast path) or through the reference.

    Same arguments and result as :func:`reference_attention`. ``impl="sdpa"`` still takes the explicit
    path for reduced precision on CPU, where it is faster (:func:`_prefer_explicit`).
    """
    if impl == "reference" or _prefer_explicit(q):
        return reference_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
    t, s = q.size(-2), k.size(-2)
    if key_padding_mask is None and (not causal or t == s):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # no mask tensor at all
    keep = None  # SDPA's bool masks mark the keys to keep
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (b, 1, 1, s)
    if causal:
        past = ~future_mask(t, s, q.device)  # (t, s)
        keep = past if keep is None else keep & past  # (b, 1, t, s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


class KVCache:
    """Keys and values of one decoder self-attention layer, growing by one position per decoding step.

    Storage is allocated on the first append (with the dtype the projections produce, e.g. bf16 under
    autocast) with room for ``capacity`` positions; a search that knows its longest output passes that, so
    no step ever reallocates (otherwise the storage doubles when full). A step writes in place.

    Beam search reorders the rows at every step. :meth:`reorder` copies only the filled positions, into a
    second buffer of the same shape that is kept and swapped (no allocation while the row count stays):
    copying the whole capacity, or allocating (page faults on CPU), cost ~5x more at paper-base.

    Attributes:
        length: Positions cached so far (L).
    """

    def __init__(self, *, capacity: int = 64):
        self.k: Tensor | None = None  # (b, h, capacity, d_k)
        self.v: Tensor | None = None  # (b, h, capacity, d_v)
        self._spare: tuple[Tensor, Tensor] | None = None  # the other buffers of reorder, same shapes
        self.capacity = capacity
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add keys (b, h, n, d_k) and values (b, h, n, d_v); return views of everything cached so far."""
        end = self.length + k.size(2)
        if self.k is None or self.v is None:
            self.capacity = max(self.capacity, end)
            self.k = k.new_empty(k.size(0), k.size(1), self.capacity, k.size(3))  # (b, h, cap, d_k)
            self.v = v.new_empty(v.size(0), v.size(1), self.capacity, v.size(3))  # (b, h, cap, d_v)
        elif end > self.capacity:
            self.capacity = max(2 * self.capacity, end)
            self.k = self._grow(self.k)
            self.v = self._grow(self.v)
            self._spare = None
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (b, h, L, d_k), (b, h, L, d_v)

    def _grow(self, buf: Tensor) -> Tensor:
        new = buf.new_empty(buf.size(0), buf.size(1), self.capacity, buf.size(3))  # (b, h, capacity, d)
        new[:, :, : self.length] = buf[:, :, : self.length]
        return new

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (b',), which may repeat rows (beam expansion)."""
        if self.k is None or self.v is None:
            return
        if torch.is_grad_enabled() and (self.k.requires_grad or self.v.requires_grad):  # out= has no autograd
            self.k, self.v, self._spare = self.k.index_select(0, index), self.v.index_select(0, index), None
            return
        rows = index.size(0)
        if self._spare is None or self._spare[0].size(0) != rows:
            self._spare = (
                self.k.new_empty(rows, *self.k.shape[1:]),  # (b', h, capacity, d_k)
                self.v.new_empty(rows, *self.v.shape[1:]),  # (b', h, capacity, d_v)
            )
        new_k, new_v = self._spare
        filled = slice(0, self.length)
        torch.index_select(self.k[:, :, filled], 0, index, out=new_k[:, :, filled])
        torch.index_select(self.v[:, :, filled], 0, index, out=new_v[:, :, filled])
        same_rows = self.k.size(0) == rows  # keep the old buffers as the next spare only if they fit
        self._spare = (self.k, self.v) if same_rows else None
        self.k, self.v = new_k, new_v


class _HeadsMixin:
    """Head split/merge and the repr shared by both attention modules."""

    d_model: int
    impl: AttentionImpl
    num_heads: int
    d_k: int
    d_v: int

    def _split(self, x: Tensor, d: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, d).transpose(1, 2)  # (b, h, n, d)

    @staticmethod
    def _merge(x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)  # (b, n, h * d_v)

    def extra_repr(self) -> str:
        dims = f"d_model={self.d_model}, num_heads={self.num_heads}, d_k={self.d_k}, d_v={self.d_v}"
        return f"{dims}, impl={self.impl}"


class MultiHeadSelfAttention(_HeadsMixin, nn.Module):
    """Self-attention: W_Q, W_K, W_V fused into one (d_model -> h*(2 d_k + d_v)) projection, then W_O.

    The fused matrix holds exactly the parameters of separate W_Q, W_K, W_V (rows in that order) and is
    initialised block by block, so it is the paper's layer computed with one matmul instead of three.

    Args:
        d_model: Width of the input and output.
        num_heads: h.
        d_k: Query/key width per head.
        d_v: Value width per head.
        bias: Biases on the projections (the paper does not say; tensor2tensor and fairseq use them).
    """

    def __init__(self, *, d_model: int, num_heads: int, d_k: int, d_v: int, bias: bool = True):
        super().__init__()
        self.d_model, self.num_heads, self.d_k, self.d_v = d_model, num_heads, d_k, d_v
        self.w_qkv = nn.Linear(d_model, num_heads * (2 * d_k + d_v), bias=bias)
        self.w_o = nn.Linear(num_heads * d_v, d_model, bias=bias)
        self.impl: AttentionImpl = "sdpa"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier uniform on W_Q, W_K, W_V, W_O separately (as if unfused); zero biases."""
        hk, hv = self.num_heads * self.d_k, self.num_heads * self.d_v
        with torch.no_grad():
            for block in self.w_qkv.weight.split([hk, hk, hv], dim=0):
                nn.init.xavier_uniform_(block)
        nn.init.xavier_uniform_(self.w_o.weight)
        for lin in (self.w_qkv, self.w_o):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hk, hv = self.num_heads * self.d_k, self.num_heads * self.d_v
        q, k, v = self.w_qkv(x).split([hk, hk, hv], dim=-1)  # (b, t, h*d_k) x2, (b, t, h*d_v)
        return self._split(q, self.d_k), self._split(k, self.d_k), self._split(v, self.d_v)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x (b, t, d_model) -> (b, t, d_model); queries, keys and values all come from x."""
        q, k, v = self._project(x)  # (b, h, t, d_k), (b, h, t, d_k), (b, h, t, d_v)
        out = attend(q, k, v, key_padding_mask=key_padding_mask, causal=causal, impl=self.impl)
        return self.w_o(self._merge(out))  # (b, t, d_model)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Incremental decoding: x (b, n, d_model) holds the next n positions; appends their K/V to cache.

        With n=1 (one token per step) the new query may see every cached key, so no mask is needed.
        """
        q, k, v = self._project(x)  # (b, h, n, d_k), (b, h, n, d_k), (b, h, n, d_v)
        k_all, v_all = cache.append(k, v)  # (b, h, L, d_k), (b, h, L, d_v)
        out = attend(q, k_all, v_all, causal=q.size(2) > 1, impl=self.impl)  # (b, h, n, d_v)
        return self.w_o(self._merge(out))  # (b, n, d_model)


class MultiHeadCrossAttention(_HeadsMixin, nn.Module):
    """Encoder-decoder attention: queries from the decoder, keys and values from the encoder memory.

    W_K and W_V are fused into one (d_model -> h*(d_k + d_v)) projection of the memory, which incremental
    decoding computes once per sentence (:meth:`project_memory`) and reuses at every step.

    Args:
        d_model: Width of the input, memory and output.
        num_heads: h.
        d_k: Query/key width per head.
        d_v: Value width per head.
        bias: Biases on the projections.
    """

    def __init__(self, *, d_model: int, num_heads: int, d_k: int, d_v: int, bias: bool = True):
        super().__init__()
        self.d_model, self.num_heads, self.d_k, self.d_v = d_model, num_heads, d_k, d_v
        self.w_q = nn.Linear(d_model, num_heads * d_k, bias=bias)
        self.w_kv = nn.Linear(d_model, num_heads * (d_k + d_v), bias=bias)
        self.w_o = nn.Linear(num_heads * d_v, d_model, bias=bias)
        self.impl: AttentionImpl = "sdpa"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier uniform on W_Q, W_K, W_V, W_O separately; zero biases."""
        with torch.no_grad():
            for block in self.w_kv.weight.split(
                [self.num_heads * self.d_k, self.num_heads * self.d_v], dim=0
            ):
                nn.init.xavier_uniform_(block)
        nn.init.xavier_uniform_(self.w_q.weight)
        nn.init.xavier_uniform_(self.w_o.weight)
        for lin in (self.w_q, self.w_kv, self.w_o):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (b, s, d_model) -> keys (b, h, s, d_k), values (b, h, s, d_v)."""
        k, v = self.w_kv(memory).split([self.num_heads * self.d_k, self.num_heads * self.d_v], dim=-1)
        return self._split(k, self.d_k), self._split(v, self.d_v)

    def attend_memory(self, x: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """x (b, t, d_model) attends to projected memory keys/values -> (b, t, d_model)."""
        q = self._split(self.w_q(x), self.d_k)  # (b, h, t, d_k)
        out = attend(q, k, v, key_padding_mask=key_padding_mask, impl=self.impl)  # (b, h, t, d_v)
        return self.w_o(self._merge(out))  # (b, t, d_model)

    def forward(self, x: Tensor, memory: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (b, t, d_model), memory (b, s, d_model), key_padding_mask (b, s) -> (b, t, d_model)."""
        return self.attend_memory(x, *self.project_memory(memory), key_padding_mask)
