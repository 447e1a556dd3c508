"""Checkpoint loading, listing and averaging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.runs.folder import checkpoint_files
from transformer_lit.checkpoints import (
    average_checkpoints,
    average_state_dicts,
    load_state_dict,
    save_state_dict,
)
from transformer_lit.model import Transformer


def lightning_ckpt(path: Path, state: dict[str, torch.Tensor], step: int = 0) -> Path:
    """What Lightning writes: the LightningModule's weights under state_dict, the model's keys prefixed."""
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": step, "epoch": 0}, path
    )
    return path


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(vocab_size=20, num_layers=1, d_model=8, d_ff=16, num_heads=2, d_k=4, d_v=4)
    return model.state_dict()


def test_load_state_dict_strips_the_prefix_and_loads_into_a_model(tmp_path: Path) -> None:
    state = tiny_state(0)
    path = lightning_ckpt(tmp_path / "last.ckpt", state)
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    model = Transformer(vocab_size=20, num_layers=1, d_model=8, d_ff=16, num_heads=2, d_k=4, d_v=4)
    model.load_state_dict(loaded)  # strict
    for key in state:
        assert torch.equal(loaded[key], state[key])


def test_averaging_two_checkpoints_gives_the_mean(tmp_path: Path) -> None:
    a, b = tiny_state(1), tiny_state(2)
    a["step_count"], b["step_count"] = torch.tensor(3), torch.tensor(7)  # an integer buffer
    paths = [
        lightning_ckpt(tmp_path / "step=0000100.ckpt", a),
        lightning_ckpt(tmp_path / "step=0000200.ckpt", b),
    ]
    avg = average_checkpoints(paths)
    assert avg.keys() == a.keys()
    for key in a:
        if key == "step_count":
            assert avg[key].item() == 7  # integer buffers come from the last checkpoint
        else:
            assert avg[key].dtype == a[key].dtype
            torch.testing.assert_close(avg[key], (a[key] + b[key]) / 2)
    # the in-memory variant agrees, and one checkpoint averages to itself
    for key, value in average_state_dicts([a, b]).items():
        torch.testing.assert_close(value, avg[key])
    for key, value in average_checkpoints(paths[:1]).items():
        assert torch.equal(value, a[key])


def test_averaging_bf16_accumulates_in_float32() -> None:
    states = [{"w": torch.full((4,), v, dtype=torch.bfloat16)} for v in (1.0, 1.0078125, 1.0078125)]
    avg = average_state_dicts(states)["w"]
    assert avg.dtype == torch.bfloat16
    assert avg.float().tolist() == pytest.approx([1.0078125] * 4)  # mean 1.0052 rounds to bf16 1.0078


def test_averaging_mismatched_checkpoints_says_which(tmp_path: Path) -> None:
    a = lightning_ckpt(tmp_path / "a.ckpt", {"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    b = lightning_ckpt(tmp_path / "b.ckpt", {"w": torch.zeros(2, 3)})
    c = lightning_ckpt(tmp_path / "c.ckpt", {"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"b\.ckpt has different parameters from .*a\.ckpt: e\.g\. 'b'"):
        average_checkpoints([a, b])
    with pytest.raises(ValueError, match=r"c\.ckpt: w has shape \(3, 2\), .*a\.ckpt has \(2, 3\)"):
        average_checkpoints([a, c])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        average_checkpoints([])


def test_list_checkpoints_sorts_by_step(tmp_path: Path) -> None:
    for name in ("step=0001000.ckpt", "step=0000200.ckpt", "last.ckpt", "step=0000030.ckpt", "other.ckpt"):
        (tmp_path / name).write_bytes(b"")
    files = checkpoint_files(tmp_path)
    assert [p.name for p in files.periodic] == ["step=0000030.ckpt", "step=0000200.ckpt", "step=0001000.ckpt"]
    assert files.last == tmp_path / "last.ckpt"
    assert checkpoint_files(tmp_path / "missing") == ([], None)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    state = tiny_state(3)
    path = save_state_dict(state, tmp_path / "sub" / "avg.pt")
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list((tmp_path / "sub").glob(".*tmp*"))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt cannot be read"):
        load_state_dict(tmp_path / "junk.ckpt")
