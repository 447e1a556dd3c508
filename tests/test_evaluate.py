"""experiments.runs.evaluate: load a run folder, eval a split, translate, average checkpoints, bad input."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments.runs.evaluate import RunFolderError, average_run, eval_run, load_run, translate_lines
from transformer_lit import config as C
from transformer_lit.checkpoints import load_state_dict
from transformer_lit.model import build_model
from transformer_lit.tokenizer import Tokenizer, train_tokenizer

PAIRS = [
    ("the cat sees the dog .", "die katze sieht den hund ."),
    ("a man saw a bird .", "ein mann hat einen vogel gesehen ."),
    ("the dog is big .", "der hund ist groß ."),
    ("we see the big cat tonight .", "wir sehen heute abend die große katze ."),
]
DEV = PAIRS[:3] + [("", "")]  # an empty line stays aligned


def make_run(root: Path, *, periodic: int = 0, positional: str = "sinusoidal") -> Path:
    """A run folder as experiments/run.py writes it, with a random tiny model."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = C.apply_overrides(
        C.base(),
        {
            "model.num_layers": 1, "model.d_model": 16, "model.d_ff": 32, "model.num_heads": 2,
            "model.d_k": 8, "model.d_v": 8, "model.positional": positional, "model.max_positions": 64,
            "data.vocab_size": 60, "eval.batch_size": 2,
        },
    )  # fmt: skip
    C.dump_yaml(cfg, run / "config.yaml")
    tok = train_tokenizer([t for pair in PAIRS for t in pair] * 5, 60)
    tok.save(run / "checkpoints" / "tokenizer.model")
    for i in range(periodic + 1):
        torch.manual_seed(i)
        state = build_model(cfg.model, tok.vocab_size, tok.pad_id).state_dict()
        name = "last.ckpt" if i == periodic else f"step={100 * (i + 1):07d}.ckpt"
        torch.save(
            {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": i},
            run / "checkpoints" / name,
        )
    return run


@pytest.fixture
def fake_corpus(monkeypatch: pytest.MonkeyPatch):
    """load_corpus(cfg.data) returns DEV as the dev split and an empty test split."""
    import transformer_lit.corpora as corpora

    def load_corpus(cfg: C.DataConfig):
        return types.SimpleNamespace(train=PAIRS, dev=DEV, test=[], name="fake")

    monkeypatch.setattr(corpora, "load_corpus", load_corpus)


def test_not_a_run_folder_says_so_in_one_line(tmp_path: Path) -> None:
    for folder, message in (
        (tmp_path / "missing", "is not a run folder: no such directory"),
        (tmp_path, "is not a run folder: it has no config.yaml"),
    ):
        with pytest.raises(RunFolderError, match=message) as err:
            eval_run(folder)
        assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    run = make_run(tmp_path)
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(RunFolderError, match=r"has no checkpoint \(checkpoints/last.ckpt missing\)"):
        load_run(run)
    with pytest.raises(RunFolderError, match="has 0 periodic checkpoints"):
        average_run(run, 5, tmp_path / "avg.pt")
    (run / "checkpoints" / "tokenizer.model").unlink()
    with pytest.raises(RunFolderError, match="has no checkpoints/tokenizer.model"):
        translate_lines(run, ["x"])


def test_load_run_and_translate_lines(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    cfg, model, tok = load_run(run)
    assert cfg.model.d_model == 16 and not model.training and isinstance(tok, Tokenizer)
    out = translate_lines(run, ["the cat .", "", "a dog"], beam=2, max_len_b=3, device="cpu")
    assert len(out) == 3 and out[1] == ""


def test_eval_run_writes_json_and_hypotheses(tmp_path: Path, fake_corpus: None) -> None:
    run = make_run(tmp_path)
    result = eval_run(run, split="dev", beam=4, alpha=0.6, max_len_b=50, device="cpu")
    saved = json.loads((run / "eval_dev.json").read_text())
    assert saved == result
    hyps = (run / "hyps_dev.txt").read_text().splitlines()
    assert len(hyps) == len(DEV) and hyps[-1] == ""
    assert result["sentences"] == len(DEV) and 0 <= result["bleu"] <= 100 and 0 <= result["bleu_tok"] <= 100
    assert result["sacrebleu_signature"].startswith("nrefs:1|case:mixed")
    # PPL: teacher forced, unsmoothed, every target token incl. EOS, recomputed here sentence by sentence
    _, model, tok = load_run(run)
    nll, count = 0.0, 0
    for src, tgt in DEV:
        ids = tok.encode(tgt)
        with torch.no_grad():
            logits = model(torch.tensor([[*tok.encode(src), tok.eos_id]]), torch.tensor([[tok.bos_id, *ids]]))
        nll += float(F.cross_entropy(logits[0], torch.tensor([*ids, tok.eos_id]), reduction="sum"))
        count += len(ids) + 1
    assert result["target_tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # another decoding gets its own files, so hyps_dev.txt keeps matching the run's own BLEU
    other = eval_run(run, beam=1, device="cpu")
    assert other["hyps_file"] == "hyps_dev_beam1.txt" and (run / "eval_dev_beam1.json").is_file()


def test_eval_and_translate_default_to_the_runs_own_eval_settings(
    tmp_path: Path, fake_corpus: None, capsys: pytest.CaptureFixture
) -> None:
    """A run trained with eval.beam_size=8 is evaluated with beam 8 (and its alpha, max_len_b); flags
    override, and a decoding other than the run's own gets its own files."""
    from experiments.cli import main as tlit

    run = make_run(tmp_path)
    own = {"eval.beam_size": 8, "eval.alpha": 0.7, "eval.max_len_b": 7}
    C.dump_yaml(C.apply_overrides(C.load_yaml(run / "config.yaml"), own), run / "config.yaml")
    assert tlit(["eval", str(run)]) == 0
    result = json.loads((run / "eval_dev.json").read_text())  # no tag: the run's own decoding
    assert (result["beam"], result["alpha"], result["max_len_b"]) == (8, 0.7, 7)
    assert tlit(["eval", str(run), "--beam", "3"]) == 0
    other = json.loads((run / "eval_dev_beam3.json").read_text())
    assert (other["beam"], other["alpha"], other["max_len_b"]) == (3, 0.7, 7)
    lines = ["the cat sees the dog .", "a man saw a bird ."]
    assert translate_lines(run, lines, device="cpu") == translate_lines(
        run, lines, beam=8, alpha=0.7, max_len_b=7, device="cpu"
    )


def test_eval_run_on_an_empty_split(tmp_path: Path, fake_corpus: None) -> None:
    with pytest.raises(ValueError, match="the test split of .* is empty"):
        eval_run(make_run(tmp_path), split="test", device="cpu")
    with pytest.raises(ValueError, match="split must be one of dev, test, got 'train'"):
        eval_run(tmp_path, split="train")


def test_average_run_and_eval_with_average(tmp_path: Path, fake_corpus: None) -> None:
    run = make_run(tmp_path, periodic=3)
    out = average_run(run, 2, tmp_path / "avg" / "avg.pt")
    avg = load_state_dict(out)
    second = load_state_dict(run / "checkpoints" / "step=0000200.ckpt")
    third = load_state_dict(run / "checkpoints" / "step=0000300.ckpt")
    for key, value in avg.items():
        torch.testing.assert_close(value, (second[key] + third[key]) / 2)
    with pytest.raises(RunFolderError, match="has 3 periodic checkpoints .*cannot average the last 4"):
        load_run(run, average=4)
    result = eval_run(run, average=2, max_len_b=3, device="cpu")
    assert result["checkpoint"] == "mean of last 2" and (run / "eval_dev_avg2_lenb3.json").is_file()
    # a chosen checkpoint file, by name inside checkpoints/
    _, model, _ = load_run(run, checkpoint="step=0000100.ckpt")
    first = load_state_dict(run / "checkpoints" / "step=0000100.ckpt")
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())


MICRO = [
    "model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.d_k=8", "model.d_v=8",
    "model.num_heads=4", "data.synthetic_pairs=400", "data.synthetic_eval_pairs=40", "data.vocab_size=200",
    "data.max_tokens=400", "optim.warmup_steps=20", "train.val_every_n_steps=40",
    "train.checkpoint_every_n_steps=10", "train.wandb=false", "train.progress_bar=false",
    "train.num_threads=1", "eval.beam_size=2", "train.max_steps=20",
]  # fmt: skip


def test_eval_on_a_run_folder_written_by_tlit_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.cli import main as tlit

    out = tmp_path / "run"
    assert tlit(["train", "--out", str(out), *MICRO, f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    trainer_hyps = (out / "hyps_dev.txt").read_text()
    # the run's own decoding settings (beam 2 here): the same hypotheses, BLEU and PPL as training reported
    result = eval_run(out, beam=2, alpha=0.6, max_len_b=50, device="cpu")
    assert (out / "hyps_dev.txt").read_text() == trainer_hyps
    assert result["bleu"] == pytest.approx(summary["bleu_dev"], abs=1e-6)
    assert result["bleu_tok"] == pytest.approx(summary["bleu_dev_tok"], abs=1e-6)
    assert result["sacrebleu_signature"] == summary["sacrebleu_signature"]
    assert result["ppl"] == pytest.approx(summary["ppl_dev"], rel=1e-4)
    # and the CLI with nothing but the folder: the run's own decoding (beam 2), the same hypotheses again;
    # --beam 4 (the paper's) gets its own files
    capsys.readouterr()
    assert tlit(["eval", str(out)]) == 0
    assert "bleu" in capsys.readouterr().out
    assert json.loads((out / "eval_dev.json").read_text())["beam"] == 2
    assert (out / "hyps_dev.txt").read_text() == trainer_hyps
    assert tlit(["eval", str(out), "--beam", "4"]) == 0
    assert (out / "eval_dev_beam4.json").is_file()
    assert tlit(["average", str(out), "--last", "2", "-o", str(tmp_path / "avg.pt")]) == 0
    assert (tmp_path / "avg.pt").is_file()
    assert tlit(["eval", str(tmp_path / "nothing")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"tlit eval: error: {tmp_path / 'nothing'} is not a run folder: no such directory"
    )
