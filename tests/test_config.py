"""Config: defaults are the paper's base, validation names field and value, YAML and overrides round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transformer_lit import config as C


def test_defaults_are_paper_base():
    cfg = C.base()
    m = cfg.model
    assert (m.num_layers, m.d_model, m.d_ff, m.num_heads, m.d_k, m.d_v) == (6, 512, 2048, 8, 64, 64)
    assert m.dropout == 0.1 and m.positional == "sinusoidal" and m.norm_order == "post"
    assert m.share_embeddings
    o = cfg.optim
    assert (o.beta1, o.beta2, o.eps, o.warmup_steps, o.label_smoothing) == (0.9, 0.98, 1e-9, 4000, 0.1)
    assert cfg.train.max_steps == 100000
    assert (cfg.eval.beam_size, cfg.eval.alpha, cfg.eval.max_len_b) == (4, 0.6, 50)


def test_configs_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        C.ModelConfig(6)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        C.base().model.d_k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_k=0", "model.d_k must be a positive integer, got 0"),
        ("model.num_heads=0", "model.num_heads must be a positive integer, got 0"),
        ("model.dropout=-0.1", "model.dropout must be in [0, 1), got -0.1"),
        ("model.positional=rotary", "model.positional must be one of sinusoidal, learned, got 'rotary'"),
        ("optim.label_smoothing=1.0", "optim.label_smoothing must be in [0, 1), got 1.0"),
        ("optim.label_smoothing=-0.5", "optim.label_smoothing must be in [0, 1), got -0.5"),
        ("model.d_k=abc", "model.d_k must be an integer, got 'abc'"),
        ("model.d_kk=3", "unknown config field model.d_kk; model has: num_layers"),
        ("modle.d_k=3", "unknown config key 'modle.d_k'"),
        ("data.corpus=wmt15", "data.corpus must be one of synthetic, text, wmt14, got 'wmt15'"),
        ("train.precision=fp8", "train.precision must be one of fp32, bf16, got 'fp8'"),
    ],
)
def test_invalid_values_name_field_and_value(override, message):
    with pytest.raises(ValueError) as err:
        C.apply_overrides(C.base(), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_types():
    cfg = C.apply_overrides(
        C.base(),
        [
            "model.d_k=16",
            "model.dropout=0",
            "optim.eps=1e-8",
            "train.wandb=false",
            "optim.grad_clip=null",
            "data.train=a,b",
            "model.positional=learned",
        ],
    )
    assert cfg.model.d_k == 16 and isinstance(cfg.model.dropout, float) and cfg.optim.eps == 1e-8
    assert cfg.train.wandb is False and cfg.optim.grad_clip is None
    assert cfg.data.train == ("a", "b") and cfg.model.positional == "learned"
    # the keys other tools rely on exist
    for key in ("train.max_steps", "train.seed", "data.corpus", "model.num_heads", "model.d_k"):
        assert key in C.field_names()


def test_yaml_round_trip(tmp_path):
    cfg = C.apply_overrides(
        C.base(),
        [
            "model.d_model=1024",
            "model.dropout=0.3",
            "model.d_k=16",
            "data.train=[x, y]",
            "optim.tokens_per_update=25000",
        ],
    )
    C.dump_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_yaml(tmp_path / "c.yaml") == cfg


def test_yaml_unknown_section_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("modell: {d_k: 3}\n")
    with pytest.raises(ValueError, match="unknown config section 'modell'"):
        C.load_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        C.load_yaml(tmp_path / "b.yaml")


def test_config_imports_no_torch():
    code = "import sys, transformer_lit, transformer_lit.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
