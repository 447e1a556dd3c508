"""A GPU request on a machine without one is one line, never a run on CPU nor a traceback (issue 12, must-fix
5: ``--devices cuda:0`` printed "20 runs on cuda:0" and trained on CPU; ``train.accelerator=gpu`` gave a
33-line Lightning traceback). "No GPU" is made real here by hiding nvidia-smi (PATH) and
CUDA_VISIBLE_DEVICES; the accelerator case needs torch to see no GPU, so it skips on a GPU machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.launchers import local


@pytest.fixture()
def no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no nvidia-smi to list GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("devices", ["cuda:0", "cuda:0,1", "gpu:1"])
def test_cuda_ids_without_gpu_refuse_like_cuda_all(devices, no_gpu, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    assert main(["grid", "run", "table3", "--devices", "cuda:all", "--runs", str(runs)]) == 2
    reference = one_line(capsys)
    assert reference == "tlit grid: error: --devices 'cuda:all': no GPU is visible here; use cpu:N or cpu:all"

    assert main(["grid", "run", "table3", "--devices", devices, "--runs", str(runs)]) == 2
    assert one_line(capsys) == reference.replace("cuda:all", devices)
    assert not runs.exists()  # nothing started, nothing written


def test_accelerator_gpu_on_cpu_slots_is_refused_by_the_grid(no_gpu, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    argv = ["grid", "run", "table3", "--rows", "base", "--devices", "cpu:1", "--runs", str(runs)]
    assert main([*argv, "train.accelerator=gpu"]) == 2
    assert one_line(capsys) == (
        "tlit grid: error: train.accelerator='gpu': no GPU is visible here; use train.accelerator=cpu or auto"
    )
    assert not runs.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_train_accelerator_gpu_without_gpu_is_one_line(accelerator, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), f"train.accelerator={accelerator}", "train.wandb=false"]) == 2
    assert one_line(capsys) == (
        f"tlit train: error: train.accelerator='{accelerator}': no GPU is visible here; "
        "use train.accelerator=cpu or auto"
    )
    assert not (out / "config.yaml").exists()  # refused before anything of the run was written


def test_more_cpu_workers_than_cores_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    n = local.cpu_count() + 2
    with caplog.at_level(logging.WARNING):
        assert len(local.parse_devices(f"cpu:{n}")) == n
        local.parse_devices(f"cpu:{n}")
        local.parse_devices(f"cpu:{local.cpu_count()}")
    warned = [r.getMessage() for r in caplog.records if "CPU workers" in r.getMessage()]
    assert warned == [
        f"--devices cpu:{n}: {n} CPU workers but {local.cpu_count()} core(s) here; "
        "they will share cores and each run slower (cpu:all gives one per core)"
    ]
