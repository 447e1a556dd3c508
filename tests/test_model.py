"""The Transformer: positions, residual order, weight tying, embedding scale, dropout placement, masks,
cached decoding, and a micro model that learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lit import ModelConfig, build_model
from transformer_lit.layers import DecoderLayer, EncoderLayer, FeedForward, NormOrder
from transformer_lit.model import Transformer
from transformer_lit.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    sinusoid_table,
)

V, PAD, BOS, EOS = 40, 0, 2, 3


def tiny(**overrides) -> Transformer:
    kw = dict(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_k=8, d_v=8, dropout=0.0)
    kw.update(overrides)
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw), V, pad_id=PAD).eval()


def batch(b: int = 3, s: int = 7, t: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (b, s), generator=g)
    src[1, 4:] = PAD
    if b > 2:
        src[2, 2:] = PAD
    tgt = torch.randint(4, V, (b, t), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


# ----------------------------------------------------------------------------------------------------------
# Positions (Section 3.5 and Table 3 row E)


def test_sinusoids_at_known_positions() -> None:
    d = 16
    pe = SinusoidalPositionalEncoding(d)(50)
    assert pe.shape == (50, d)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * (d // 2)))
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert pe[1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-7)
    for pos, i in [(3, 1), (17, 4), (49, 7)]:
        angle = pos / 10000 ** (2 * i / d)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    odd = sinusoid_table(4, 5)  # odd width: the last column is a sine
    assert odd[1, 4].item() == pytest.approx(math.sin(1 / 10000 ** (4 / 5)), abs=1e-6)


def test_sinusoids_extend_on_demand_and_take_an_offset() -> None:
    pe = SinusoidalPositionalEncoding(8, initial_length=16)
    long = pe(40)  # longer than the cache: grows, no error
    assert long.shape == (40, 8) and pe.table.size(0) >= 40
    torch.testing.assert_close(long, sinusoid_table(40, 8))
    torch.testing.assert_close(pe(3, offset=20), long[20:23])
    assert "table" not in pe.state_dict()  # non-persistent buffer: not in checkpoints
    assert pe.bfloat16()(100).dtype == torch.bfloat16  # growing keeps the module's dtype


def test_learned_positions_offset_and_limit() -> None:
    pe = LearnedPositionalEmbedding(8, max_positions=10)
    assert pe(4).shape == (4, 8)
    torch.testing.assert_close(pe(2, offset=5), pe.weight[5:7])
    with pytest.raises(ValueError, match="max_positions=10"):
        pe(11)
    with pytest.raises(ValueError, match="max_positions"):
        pe(1, offset=10)
    model = tiny(positional="learned", max_positions=12)
    assert isinstance(model.src_embed.positions, LearnedPositionalEmbedding)
    assert model.src_embed.positions is not model.tgt_embed.positions  # one table per side


def test_long_test_sentences_work_with_sinusoids() -> None:
    model = tiny(max_positions=8)  # cache of 8 positions; longer inputs extend it
    src, tgt = torch.randint(4, V, (1, 20)), torch.randint(4, V, (1, 12))
    assert model(src, tgt).shape == (1, 12, V)


# ----------------------------------------------------------------------------------------------------------
# Residual blocks (Section 3.1) and dropout placement (Section 5.4)


def test_post_layer_norm_order_is_the_papers() -> None:
    torch.manual_seed(0)
    layer = EncoderLayer(
        d_model=16, d_ff=32, num_heads=2, d_k=4, d_v=8, dropout=0.0, norm_order="post"
    ).eval()
    with torch.no_grad():
        for norm in layer.norms:  # non-trivial gains and biases so that a misplaced norm shows
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 16)
    h = layer.norms[0](x + layer.self_attn(x))  # LayerNorm(x + Sublayer(x))
    expected = layer.norms[1](h + layer.feed_forward(h))
    torch.testing.assert_close(layer(x, None), expected)

    pre = EncoderLayer(d_model=16, d_ff=32, num_heads=2, d_k=4, d_v=8, dropout=0.0, norm_order="pre").eval()
    pre.load_state_dict(layer.state_dict())
    h = x + pre.self_attn(pre.norms[0](x))  # x + Sublayer(LayerNorm(x))
    torch.testing.assert_close(pre(x, None), h + pre.feed_forward(pre.norms[1](h)))
    assert not torch.allclose(pre(x, None), layer(x, None))


def test_decoder_layer_post_norm_order() -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(d_model=16, d_ff=32, num_heads=2, d_k=4, d_v=8, dropout=0.0).eval()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    h = layer.norms[0](x + layer.self_attn(x, causal=True))
    h = layer.norms[1](h + layer.cross_attn(h, memory))
    torch.testing.assert_close(layer(x, memory, None), layer.norms[2](h + layer.feed_forward(h)))
    assert layer.norm_order is NormOrder.POST
    assert "Section 3.1" in NormOrder.__doc__


def test_pre_norm_adds_final_layer_norms_only_in_pre_mode() -> None:
    assert tiny().encoder.final_norm is None and tiny().decoder.final_norm is None
    pre = tiny(norm_order="pre")
    assert isinstance(pre.encoder.final_norm, nn.LayerNorm) and isinstance(
        pre.decoder.final_norm, nn.LayerNorm
    )


def test_dropout_only_on_sublayer_outputs_and_embedding_sums() -> None:
    model = tiny(dropout=0.3).train()
    n = 2
    dropouts = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 * n + 3 * n + 2  # 2 per encoder layer, 3 per decoder layer, 2 embeddings
    assert {name.rsplit(".", 2)[-2] if "dropouts" in name else name for name in dropouts} == {
        "dropouts",
        "src_embed.dropout",
        "tgt_embed.dropout",
    }
    for module in model.modules():
        if isinstance(module, FeedForward) or "Attention" in type(module).__name__:
            assert not any(isinstance(m, nn.Dropout) for m in module.modules())
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
    src, tgt = batch()
    model(src, tgt)
    assert calls == dict.fromkeys(dropouts, 1)  # each applied exactly once per forward
    assert not torch.equal(model(src, tgt), model(src, tgt))  # active in training
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


# ----------------------------------------------------------------------------------------------------------
# Embeddings (Section 3.4)


def test_one_matrix_for_source_target_and_output_projection() -> None:
    model = tiny()
    w = model.src_embed.token.weight
    assert model.tgt_embed.token.weight is w and model.output_proj.weight is w
    assert model.output_proj.weight.data_ptr() == w.data_ptr()
    assert sum(p is w for p in model.parameters()) == 1
    src, tgt = batch()
    model(src, tgt).sum().backward()
    assert w.grad is not None
    untied = tiny(share_embeddings=False)
    weights = [untied.src_embed.token.weight, untied.tgt_embed.token.weight, untied.output_proj.weight]
    assert len({p.data_ptr() for p in weights}) == 3


def test_embedding_scaled_by_sqrt_d_model_plus_positions() -> None:
    model = tiny()
    tokens = torch.tensor([[5, 9, PAD]])
    expected = model.src_embed.token.weight[tokens] * math.sqrt(32) + sinusoid_table(3, 32)
    torch.testing.assert_close(model.src_embed(tokens), expected)
    torch.testing.assert_close(model.tgt_embed(tokens[:, 1:], offset=1), expected[:, 1:])


def test_initialisation() -> None:
    model = tiny(d_model=64, num_heads=4, d_k=16, d_v=16)
    w = model.src_embed.token.weight
    assert w[PAD].abs().max() == 0  # PAD row zero
    assert w[1:].std().item() == pytest.approx(64**-0.5, rel=0.1)  # unit variance after the sqrt(d) scale
    ff = model.encoder.layers[0].feed_forward.w_1
    assert ff.bias.abs().max() == 0 and ff.weight.abs().max() <= math.sqrt(6 / (64 + 64))


def test_fan_in_init_shrinks_only_the_residual_branch_outputs() -> None:
    """init=fan_in: W_O, W_1, W_2 drawn from U(+-1/sqrt(fan_in)); W_Q, W_K, W_V stay Xavier."""
    xavier, fan_in = (
        tiny(d_model=64, d_ff=256, num_heads=4, d_k=16, d_v=16, init=i) for i in ("xavier", "fan_in")
    )
    for model in (xavier, fan_in):
        layer = model.decoder.layers[0]
        branch_outputs = [
            layer.self_attn.w_o,
            layer.cross_attn.w_o,
            layer.feed_forward.w_1,
            layer.feed_forward.w_2,
        ]
        for lin in branch_outputs:
            bound, top = lin.in_features**-0.5, lin.weight.abs().max().item()
            assert (top <= bound and top > 0.9 * bound) == (model is fan_in), (lin, top, bound)
            assert lin.bias.abs().max() == 0
        qkv = layer.self_attn.w_qkv.weight[:64]  # W_Q: 64 x 64, Xavier bound sqrt(6/128)
        assert 0.9 * math.sqrt(6 / 128) < qkv.abs().max() <= math.sqrt(6 / 128)
    with pytest.raises(ValueError, match="init must be one of xavier, fan_in"):
        tiny(init="kaiming")


# ----------------------------------------------------------------------------------------------------------
# The whole model: shapes, masks, reference path, precision


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"d_k": 2, "d_v": 8},
        {"num_heads": 1, "d_k": 32, "d_v": 32},
        {"norm_order": "pre"},
        {"positional": "learned"},
    ],
)
def test_shapes_for_table3_style_variants(overrides: dict) -> None:
    model = tiny(**overrides)
    src, tgt = batch()
    memory, src_pad_mask = model.encode(src)
    assert memory.shape == (3, 7, 32) and src_pad_mask.dtype == torch.bool
    assert torch.equal(src_pad_mask, src.eq(PAD))
    assert model.decode(tgt, memory, src_pad_mask).shape == (3, 6, V)
    assert model(src, tgt).shape == (3, 6, V)


def test_decoder_sees_no_future_target_token() -> None:
    model = tiny()
    src, tgt = batch()
    logits = model(src, tgt)
    for i in range(tgt.size(1) - 1):
        changed = tgt.clone()
        changed[:, i + 1 :] = torch.randint(4, V, changed[:, i + 1 :].shape)
        torch.testing.assert_close(model(src, changed)[:, : i + 1], logits[:, : i + 1])


def test_source_padding_is_ignored() -> None:
    model = tiny()
    src, tgt = batch()
    logits = model(src, tgt)
    more_padding = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    torch.testing.assert_close(model(more_padding, tgt), logits, atol=1e-5, rtol=1e-5)
    alone = model(src[2:, :2], tgt[2:])  # the row with 2 real tokens, without its padding
    torch.testing.assert_close(alone, logits[2:], atol=1e-5, rtol=1e-5)


def test_sdpa_model_equals_reference_model() -> None:
    model = tiny(d_k=4, d_v=12)
    src, tgt = batch()
    fast = model(src, tgt)
    model.set_attention_impl("reference")
    torch.testing.assert_close(model(src, tgt), fast, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32() -> None:
    model = tiny()
    src, tgt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(src, tgt)
    torch.testing.assert_close(low.float().softmax(-1), model(src, tgt).softmax(-1), atol=3e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Incremental decoding


@pytest.mark.parametrize(
    "overrides", [{}, {"norm_order": "pre"}, {"positional": "learned"}, {"d_k": 3, "d_v": 10, "num_heads": 2}]
)
def test_decode_step_equals_full_recompute(overrides: dict) -> None:
    model = tiny(**overrides)
    src, tgt = batch(t=9)
    with torch.no_grad():
        memory, src_pad_mask = model.encode(src)
        full = model.decode(tgt, memory, src_pad_mask)
        cache = model.init_cache(memory, src_pad_mask)
        for i in range(tgt.size(1)):
            assert cache.length == i
            torch.testing.assert_close(model.decode_step(tgt[:, i], cache), full[:, i], atol=1e-5, rtol=1e-5)


def test_decode_step_past_the_initial_cache_capacity() -> None:
    model = tiny(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_k=8, d_v=8)
    src, tgt = batch(b=2, t=70)
    with torch.no_grad():
        memory, mask = model.encode(src)
        full = model.decode(tgt, memory, mask)
        cache = model.init_cache(memory, mask)
        steps = torch.stack([model.decode_step(tgt[:, i], cache) for i in range(70)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_decoder_cache_reorder_with_repeated_rows() -> None:
    model = tiny()
    src, tgt = batch(t=6)
    index = torch.tensor([2, 0, 0, 1, 2])  # beam-style: rows repeat, order changes, batch grows
    with torch.no_grad():
        memory, mask = model.encode(src)
        cache = model.init_cache(memory, mask)
        for i in range(3):
            model.decode_step(tgt[:, i], cache)
        cache.reorder(index)
        assert cache.batch_size == 5 and cache.length == 3
        steps = torch.stack([model.decode_step(tgt[index, i], cache) for i in range(3, 6)], dim=1)
        full = model.decode(tgt[index], memory[index], mask[index])
    torch.testing.assert_close(steps, full[:, 3:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Builder and learning


def test_build_model_reads_every_model_field() -> None:
    cfg = ModelConfig(
        num_layers=3, d_model=24, d_ff=40, num_heads=3, d_k=5, d_v=7, dropout=0.2, positional="learned",
        max_positions=50, norm_order="pre", share_embeddings=False, layer_norm_eps=1e-5, init="fan_in",
    )  # fmt: skip
    model = build_model(cfg, 30, pad_id=1)
    assert (model.vocab_size, model.pad_id, model.d_model) == (30, 1, 24)
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 3
    layer = model.decoder.layers[0]
    assert layer.feed_forward.w_1.out_features == 40
    assert (layer.cross_attn.num_heads, layer.cross_attn.d_k, layer.cross_attn.d_v) == (3, 5, 7)
    assert layer.dropouts[0].p == 0.2 and layer.norms[0].eps == 1e-5 and layer.norm_order is NormOrder.PRE
    assert model.src_embed.positions.max_positions == 50
    assert layer.feed_forward.w_2.weight.abs().max() <= 40**-0.5  # init=fan_in reached the model
    assert model.src_embed.token.weight is not model.output_proj.weight
    assert "d_model=24" in repr(model) and "norm_order=pre" in repr(model)
    with pytest.raises(ValueError, match="pad_id"):
        build_model(cfg, 30, pad_id=30)


def test_micro_model_overfits_a_handful_of_pairs() -> None:
    """Reverse 6 short sequences; greedy cached decoding then reproduces every target."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(num_layers=1, d_model=32, d_ff=64, num_heads=4, d_k=8, d_v=8, dropout=0.0), 16
    )
    g = torch.Generator().manual_seed(0)
    body = torch.randint(4, 16, (6, 5), generator=g)
    src = torch.cat([body, torch.full((6, 1), EOS)], dim=1)
    tgt_out = torch.cat([body.flip(1), torch.full((6, 1), EOS)], dim=1)
    tgt_in = torch.cat([torch.full((6, 1), BOS), tgt_out[:, :-1]], dim=1)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(150):
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.05
    model.eval()
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src))
        token, out = torch.full((6,), BOS), []
        for _ in range(6):
            token = model.decode_step(token, cache).argmax(-1)
            out.append(token)
    assert torch.equal(torch.stack(out, dim=1), tgt_out)
