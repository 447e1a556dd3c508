"""Multi-head attention: shapes with independent h, d_k, d_v; masks; SDPA vs the naive reference; caches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from transformer_lit.attention import (
    KVCache,
    MultiHeadCrossAttention,
    MultiHeadSelfAttention,
    attend,
    reference_attention,
)
from transformer_lit.decoding import beam_search
from transformer_lit.model import Transformer

# (num_heads, d_k, d_v) at d_model 32: base-like, row B (d_k < d_v), row A1 (h=1, d_k=d_v=d_model), odd
HEAD_SHAPES = [(4, 8, 8), (4, 2, 8), (1, 32, 32), (3, 5, 7)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]  # (b, s) True at PAD


@pytest.mark.parametrize(("num_heads", "d_k", "d_v"), HEAD_SHAPES)
def test_shapes_and_projection_sizes(num_heads: int, d_k: int, d_v: int) -> None:
    self_attn = MultiHeadSelfAttention(d_model=32, num_heads=num_heads, d_k=d_k, d_v=d_v)
    cross_attn = MultiHeadCrossAttention(d_model=32, num_heads=num_heads, d_k=d_k, d_v=d_v)
    assert self_attn.w_qkv.weight.shape == (num_heads * (2 * d_k + d_v), 32)  # W_Q, W_K, W_V stacked
    assert self_attn.w_o.weight.shape == (32, num_heads * d_v)
    assert cross_attn.w_q.weight.shape == (num_heads * d_k, 32)
    assert cross_attn.w_kv.weight.shape == (num_heads * (d_k + d_v), 32)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    assert self_attn(x).shape == (2, 5, 32)
    assert self_attn(x, causal=True).shape == (2, 5, 32)
    assert cross_attn(x, memory, key_padding_mask=_padding([7, 3], 7)).shape == (2, 5, 32)
    k, v = cross_attn.project_memory(memory)
    assert k.shape == (2, num_heads, 7, d_k) and v.shape == (2, num_heads, 7, d_v)


def test_reference_matches_a_hand_computation() -> None:
    """One head, one query, two keys: softmax(q.k / sqrt(d_k)) weights the values."""
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])  # (1, 1, 1, 4): d_k = 4, sqrt(d_k) = 2
    k = torch.tensor([[[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    w = torch.tensor([math.exp(1.0), 1.0]) / (math.exp(1.0) + 1.0)  # scores 2/2 = 1 and 0
    torch.testing.assert_close(reference_attention(q, k, v)[0, 0, 0], w)


@pytest.mark.parametrize(("num_heads", "d_k", "d_v"), HEAD_SHAPES)
@pytest.mark.parametrize(("padded", "causal"), [(False, False), (True, False), (False, True), (True, True)])
def test_sdpa_equals_reference(num_heads: int, d_k: int, d_v: int, padded: bool, causal: bool) -> None:
    b, t = 3, 6
    q, k = torch.randn(b, num_heads, t, d_k), torch.randn(b, num_heads, t, d_k)
    v = torch.randn(b, num_heads, t, d_v)
    mask = _padding([6, 4, 1], t) if padded else None
    fast = attend(q, k, v, key_padding_mask=mask, causal=causal)
    slow = reference_attention(q, k, v, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("num_heads", "d_k", "d_v"), HEAD_SHAPES)
def test_modules_sdpa_equal_reference_with_gradients(num_heads: int, d_k: int, d_v: int) -> None:
    self_attn = MultiHeadSelfAttention(d_model=32, num_heads=num_heads, d_k=d_k, d_v=d_v)
    cross_attn = MultiHeadCrossAttention(d_model=32, num_heads=num_heads, d_k=d_k, d_v=d_v)
    x, memory, mask = torch.randn(2, 5, 32), torch.randn(2, 4, 32), _padding([4, 2], 4)
    outputs, grads = {}, {}
    for impl in ("sdpa", "reference"):
        self_attn.impl = cross_attn.impl = impl
        out = self_attn(x, causal=True) + cross_attn(x, memory, key_padding_mask=mask)
        self_attn.zero_grad()
        out.square().sum().backward()
        outputs[impl], grads[impl] = out, self_attn.w_qkv.weight.grad.clone()
    torch.testing.assert_close(outputs["sdpa"], outputs["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["sdpa"], grads["reference"], atol=1e-4, rtol=1e-4)


def test_bf16_cpu_path_matches_sdpa() -> None:
    """On CPU, bf16 takes the explicit path (faster there); it must agree with SDPA's kernel."""
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = _padding([6, 3], 6)
    for causal in (False, True):
        ours = attend(q, k, v, key_padding_mask=mask, causal=causal)
        keep = ~mask[:, None, None, :] & (torch.ones(6, 6, dtype=torch.bool).tril() if causal else True)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        torch.testing.assert_close(ours.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_fully_masked_row_gives_zeros_not_nan(impl: str) -> None:
    q = torch.randn(2, 2, 3, 4, requires_grad=True)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 6)
    mask = _padding([5, 0], 5)  # second row: every key is PAD
    out = attend(q, k, v, key_padding_mask=mask, impl=impl)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_causal_mask_leaks_no_future_position() -> None:
    attn = MultiHeadSelfAttention(d_model=16, num_heads=2, d_k=4, d_v=8)
    x = torch.randn(2, 7, 16)
    out = attn(x, causal=True)
    for i in range(6):
        changed = x.clone()
        changed[:, i + 1 :] = torch.randn_like(changed[:, i + 1 :])
        torch.testing.assert_close(attn(changed, causal=True)[:, : i + 1], out[:, : i + 1])
        assert not torch.allclose(attn(changed, causal=True)[:, i + 1 :], out[:, i + 1 :])


def test_padding_mask_ignores_padded_keys() -> None:
    self_attn = MultiHeadSelfAttention(d_model=16, num_heads=2, d_k=4, d_v=8)
    cross_attn = MultiHeadCrossAttention(d_model=16, num_heads=2, d_k=4, d_v=8)
    x, memory, mask = torch.randn(2, 5, 16), torch.randn(2, 6, 16), _padding([6, 3], 6)
    changed = memory.clone()
    changed[1, 3:] = torch.randn(3, 16)  # only padded positions differ
    torch.testing.assert_close(
        cross_attn(x, changed, key_padding_mask=mask), cross_attn(x, memory, key_padding_mask=mask)
    )
    # self-attention: the real positions of a padded sequence do not see its padding
    out = self_attn(memory, key_padding_mask=mask)
    torch.testing.assert_close(self_attn(changed, key_padding_mask=mask)[1, :3], out[1, :3])
    torch.testing.assert_close(self_attn(memory[1:, :3])[0], out[1, :3], atol=1e-6, rtol=1e-5)


def test_no_dropout_inside_attention() -> None:
    for module in (
        MultiHeadSelfAttention(d_model=16, num_heads=2, d_k=4, d_v=8),
        MultiHeadCrossAttention(d_model=16, num_heads=2, d_k=4, d_v=8),
    ):
        assert not any(isinstance(m, nn.Dropout) for m in module.modules())
        module.train()
        x = torch.randn(1, 3, 16)
        out = module(x) if isinstance(module, MultiHeadSelfAttention) else module(x, x)
        assert torch.equal(out, module(x) if isinstance(module, MultiHeadSelfAttention) else module(x, x))


def test_projections_are_xavier_initialised_block_by_block() -> None:
    """The fused W_Q|W_K|W_V matrix is initialised as three separate Xavier-uniform matrices."""
    attn = MultiHeadSelfAttention(d_model=64, num_heads=2, d_k=8, d_v=32)
    for block, fan_out in zip(attn.w_qkv.weight.split([16, 16, 64]), [16, 16, 64], strict=True):
        bound = math.sqrt(6.0 / (64 + fan_out))
        assert block.abs().max() <= bound
        assert block.abs().max() > 0.8 * bound
    assert attn.w_qkv.bias.abs().max() == 0


def test_self_attention_step_with_cache_equals_causal_forward() -> None:
    attn = MultiHeadSelfAttention(d_model=16, num_heads=2, d_k=3, d_v=5)
    x = torch.randn(3, 9, 16)
    full = attn(x, causal=True)
    cache = KVCache(capacity=2)  # grows twice on the way
    steps = [attn.step(x[:, i : i + 1], cache) for i in range(9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9
    # several positions at once continue the same cache
    cache = KVCache()
    first = attn.step(x[:, :4], cache)
    rest = attn.step(x[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_with_repeated_rows() -> None:
    attn = MultiHeadSelfAttention(d_model=16, num_heads=2, d_k=4, d_v=4)
    x = torch.randn(3, 5, 16)
    cache = KVCache()
    for i in range(3):
        attn.step(x[:, i : i + 1], cache)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    out = [attn.step(x[index, i : i + 1], cache) for i in range(3, 5)]
    full = attn(x[index], causal=True)
    torch.testing.assert_close(torch.cat(out, dim=1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_swaps_two_buffers_and_copies_only_the_filled_positions() -> None:
    """Beam search reorders at every step: with a fixed row count the two buffers take turns (no allocation),
    and positions past the cached length are never copied."""
    cache = KVCache(capacity=6)
    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 7)  # (b, h, n, d_k), (b, h, n, d_v)
    with torch.inference_mode():
        cache.append(k, v)
        first = cache.k.data_ptr()
        cache.reorder(torch.tensor([2, 0, 0]))
        second = cache.k.data_ptr()
        cache.reorder(torch.tensor([1, 1, 2]))  # rows 1, 1, 2 of [2, 0, 0] = original 0, 0, 0
        assert cache.k.data_ptr() == first != second
        torch.testing.assert_close(cache.k[:, :, :4], k[[0, 0, 0]], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, :, :4], v[[0, 0, 0]], rtol=0, atol=0)
        cache.reorder(torch.tensor([0, 2]))  # fewer rows (finished sentences leave): new buffers
        assert cache.k.shape == (2, 2, 6, 5) and cache.length == 4
        k_all, _ = cache.append(torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 7))
        torch.testing.assert_close(k_all[:, :, :4], k[[0, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_causal_queries_aligned_to_the_last_keys(padded: bool) -> None:
    """With t < s queries, causal means the queries are the last t positions (cached decoding of n tokens)."""
    q, k, v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 5)
    mask = _padding([6, 5], 6) if padded else None
    full = attend(q, k, v, key_padding_mask=mask, causal=True)
    for impl in ("sdpa", "reference"):
        tail = attend(q[:, :, 4:], k, v, key_padding_mask=mask, causal=True, impl=impl)
        torch.testing.assert_close(tail, full[:, :, 4:], atol=1e-5, rtol=1e-5)


def test_our_masks_run_on_the_cpu_flash_kernel() -> None:
    """With SDPA's math kernel disabled, training (bool key-padding masks, the causal flag) and cached beam
    search still run: our masks do not force the math fallback. CPU flash needs d_k == d_v; the CUDA kernels
    are checked by test_gpu_speed.py."""
    model = Transformer(vocab_size=50, num_layers=1, d_model=16, d_ff=32, num_heads=2, d_k=8, d_v=8)
    src = torch.randint(4, 50, (3, 6))
    src[0, 4:] = 0  # PAD
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model(src, torch.randint(4, 50, (3, 5))).sum().backward()
        beam_search(model.eval(), src, beam_size=2, max_len_b=3)
    with pytest.raises(RuntimeError, match="No available kernel"), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        attend(*(torch.randn(2, 2, 3, d) for d in (4, 4, 8)))  # the check can fail: d_k != d_v needs math
