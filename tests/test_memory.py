"""The memory and disk estimate (transformer_lit/memory.py): the paper's sizes, its scaling, and a real run's
checkpoints (what is kept, what is pruned, and their size against the estimate)."""

from __future__ import annotations

from dataclasses import replace

from experiments.grids import grid as G
from experiments.grids import runner as gridrun
from experiments.runs import folder as RF
from experiments.runs import run as R
from tests.test_train_run import micro_args
from transformer_lit import config as C
from transformer_lit import memory as M
from transformer_lit.params import count_parameters


def paper(row: str) -> C.RunConfig:
    (spec,) = gridrun.specs_for(G.load_grid("table3"), "paper", rows=row)
    return spec.config


def test_paper_checkpoints_keep_what_the_paper_averages() -> None:
    base, big = paper("base"), paper("big")
    assert (base.train.keep_checkpoints, big.train.keep_checkpoints) == (5, 20)  # Section 6.1
    params = count_parameters(big.model, big.data.vocab_size)
    assert M.checkpoint_disk(big) == 21 * 12 * params  # 20 periodic + last.ckpt, weights + Adam moments
    assert 45e9 < M.checkpoint_disk(big) < 60e9  # "a paper-scale big run keeping 20 checkpoints: ~50 GB"
    assert M.checkpoint_disk(base) < M.checkpoint_disk(big) / 10


def test_training_memory_parts_scale_as_they_should() -> None:
    cfg = paper("base")
    est = M.training_memory(cfg)
    assert est.states == 16 * count_parameters(cfg.model, cfg.data.vocab_size)
    assert est.total == est.states + est.activations + est.loss + est.overhead
    double = C.apply_overrides(cfg, [f"data.max_tokens={2 * cfg.data.max_tokens}"])
    assert M.activation_bytes(double) == 2 * M.activation_bytes(cfg)
    fp32 = replace(cfg, train=replace(cfg.train, precision="fp32"))
    assert M.activation_bytes(cfg) < M.activation_bytes(fp32) < 2 * M.activation_bytes(cfg)
    plain = replace(cfg, train=replace(cfg.train, loss_chunk_tokens=None))
    assert M.loss_bytes(plain) > 1.2e9 > M.loss_bytes(cfg) / 2  # 4096 x 37k fp32 logits + grad, whole
    big = M.training_memory(paper("big"))
    assert est.total < big.total < 141e9 / 8  # a big run fits an H200 many times over
    assert M.fmt_bytes(53.7e9) == "53.7 GB" and M.fmt_bytes(2.5e6) == "2.5 MB"


def test_a_real_run_keeps_its_last_periodic_checkpoints_at_the_estimated_size(tmp_path) -> None:
    """Periodic checkpoints beyond ``keep_checkpoints`` are deleted as training goes; the files kept are
    the estimate's size (weights + Adam moments) up to Lightning's few kB of metadata."""
    args = [*micro_args(tmp_path, steps=40), "model.d_model=64", "model.d_ff=128", "train.keep_checkpoints=2"]
    cfg = C.apply_overrides(C.base(), args)
    out = tmp_path / "run"
    R.train(cfg, out)
    files = RF.checkpoint_files(out / RF.CKPT_DIR)
    assert [p.name for p in files.periodic] == ["step=0000030.ckpt", "step=0000040.ckpt"]
    sizes = [p.stat().st_size for p in [*files.periodic, out / RF.CKPT_DIR / RF.LAST_CKPT]]
    estimate = M.checkpoint_bytes(cfg)
    assert all(0.95 * estimate < s < estimate + 64_000 for s in sizes), (sizes, estimate)
    assert abs(sum(sizes) - M.checkpoint_disk(cfg)) < 3 * 64_000
