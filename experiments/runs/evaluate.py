"""Evaluate, translate with and average a finished (or running) run folder: ``tlit eval|translate|average``.

A run folder needs nothing else (docs/DESIGN.md, "Run folder")::

    config.yaml                  the resolved config: model shape, corpus, decoding defaults
    checkpoints/tokenizer.model  the shared subword vocabulary
    checkpoints/last.ckpt        the latest weights (Lightning; the model's keys prefixed ``model.``)
    checkpoints/step=NNNNNNN.ckpt  periodic checkpoints, averaged by ``--average K``

``eval_run`` writes ``eval_<split>.json`` and ``hyps_<split>.txt``. When the decoding differs from the run's
own (another beam, alpha or max_len_b than ``config.yaml``'s eval section, averaged or chosen weights), the
names carry a tag, e.g. ``eval_dev_avg5.json``, so that ``hyps_dev.txt`` keeps matching the summary's
``bleu_dev``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.runs import folder as RF
from transformer_lit import config as C

if TYPE_CHECKING:
    import torch

    from transformer_lit.model import Transformer
    from transformer_lit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """A folder is not a usable run: no config.yaml, no tokenizer or no checkpoint. One line, no traceback."""


# ----------------------------------------------------------------------------------------------------------
# Loading


def _checkpoint_paths(run_dir: Path, average: int | None, checkpoint: str | None) -> list[Path]:
    """The checkpoint file(s) whose weights to use: one file, or the last ``average`` periodic ones."""
    if average is not None and checkpoint is not None:
        raise RunFolderError("give either average or checkpoint, not both")
    ckpt_dir = run_dir / RF.CKPT_DIR
    if checkpoint is not None:
        for candidate in (Path(checkpoint), run_dir / checkpoint, ckpt_dir / checkpoint):
            if candidate.is_file():
                return [candidate]
        raise RunFolderError(f"checkpoint {checkpoint} not found (looked in . , {run_dir} and {ckpt_dir})")
    files = RF.checkpoint_files(ckpt_dir)
    if average is not None:
        if average < 1:
            raise RunFolderError(f"average must be >= 1 checkpoints, got {average}")
        if len(files.periodic) < average:
            raise RunFolderError(
                f"{run_dir} has {len(files.periodic)} periodic checkpoints (step=*.ckpt), "
                f"cannot average the last {average}"
            )
        return files.periodic[-average:]
    if files.last is not None:
        return [files.last]
    if files.periodic:
        return [files.periodic[-1]]
    raise RunFolderError(
        f"{run_dir} has no checkpoint ({RF.CKPT_DIR}/{RF.LAST_CKPT} missing): has it trained yet?"
    )


def load_run(
    run_dir: str | Path, average: int | None = None, checkpoint: str | None = None
) -> tuple[C.RunConfig, Transformer, Tokenizer]:
    """The config, the model (CPU, eval mode) and the tokenizer of a run folder.

    Args:
        run_dir: the run folder.
        average: average the weights of the last K periodic checkpoints instead of using last.ckpt.
        checkpoint: a checkpoint file to use instead (a path, or a name inside the run's checkpoints/).

    Raises:
        RunFolderError: not a run folder, or no tokenizer or checkpoint in it.
    """
    from transformer_lit.checkpoints import average_checkpoints, load_state_dict
    from transformer_lit.model import build_model
    from transformer_lit.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a run folder: no such directory")
    if not (run_dir / RF.CONFIG).is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {RF.CONFIG}")
    cfg = C.load_yaml(run_dir / RF.CONFIG)
    tok_path = run_dir / RF.CKPT_DIR / RF.TOKENIZER
    if not tok_path.is_file():
        raise RunFolderError(f"{run_dir} has no {RF.CKPT_DIR}/{RF.TOKENIZER}: has it trained yet?")
    paths = _checkpoint_paths(run_dir, average, checkpoint)
    tokenizer = Tokenizer.load(tok_path)
    state = average_checkpoints(paths) if len(paths) > 1 else load_state_dict(paths[0])
    model = build_model(cfg.model, tokenizer.vocab_size, tokenizer.pad_id)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise RunFolderError(f"{paths[-1]} does not fit {run_dir / RF.CONFIG}'s model: {detail}") from None
    log.info("loaded %s from %s", run_dir, paths[0].name if len(paths) == 1 else f"the mean of {len(paths)}")
    return cfg, model.eval(), tokenizer


def _device(device: str | None) -> torch.device:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _autocast(cfg: C.RunConfig, device: torch.device, precision: str | None) -> Any:
    """bf16 autocast when the run trained in bf16 (as its own dev BLEU was decoded), else nothing."""
    import torch

    if (precision or cfg.train.precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Perplexity by teacher forcing


def teacher_forced_nll(
    model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64
) -> tuple[float, int]:
    """Summed NLL (natural log, no label smoothing) of the gold targets and the number of target tokens.

    Every target token counts, EOS included, PAD never (the paper's per-subword perplexity). Sentences
    longer than a learned position table are truncated (with a warning) instead of failing.
    """
    import torch
    from torch.nn.functional import cross_entropy

    from transformer_lit.decoding import eval_mode, pad_batch, position_limit

    limit = position_limit(model)
    src = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode_batch([s for s, _ in pairs])]
    tgt = tokenizer.encode_batch([t for _, t in pairs])
    if limit is not None:
        cut = sum(len(s) > limit or len(t) + 1 > limit for s, t in zip(src, tgt, strict=True))
        if cut:
            log.warning(
                "perplexity: truncated %d of %d pairs to the %d learned positions", cut, len(pairs), limit
            )
        src = [s[:limit] for s in src]
        tgt = [t[: limit - 1] for t in tgt]
    order = sorted(range(len(pairs)), key=lambda i: (len(tgt[i]), len(src[i])))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src_b = pad_batch([src[i] for i in chunk], model.pad_id, device)  # (b, s)
            tgt_in = pad_batch([[tokenizer.bos_id, *tgt[i]] for i in chunk], model.pad_id, device)  # (b, t)
            tgt_out = pad_batch([[*tgt[i], tokenizer.eos_id] for i in chunk], model.pad_id, device)  # (b, t)
            logits = model(src_b, tgt_in).float()  # (b, t, V)
            nll += float(
                cross_entropy(
                    logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.pad_id, reduction="sum"
                )
            )
            count += int(tgt_out.ne(model.pad_id).sum())
    return nll, count


# ----------------------------------------------------------------------------------------------------------
# Commands


def _decoding(
    cfg: C.RunConfig, beam: int | None, alpha: float | None, max_len_b: int | None
) -> tuple[int, float, int]:
    """The decoding settings asked for, the run's own (``eval`` of its config.yaml) where not given."""
    e = cfg.eval
    return (
        e.beam_size if beam is None else beam,
        e.alpha if alpha is None else alpha,
        e.max_len_b if max_len_b is None else max_len_b,
    )


def _tag(
    cfg: C.RunConfig, beam: int, alpha: float, max_len_b: int, average: int | None, checkpoint: str | None
) -> str:
    parts = []
    if checkpoint is not None:
        parts.append(Path(checkpoint).stem)
    if average is not None:
        parts.append(f"avg{average}")
    if beam != cfg.eval.beam_size:
        parts.append(f"beam{beam}")
    if alpha != cfg.eval.alpha:
        parts.append(f"alpha{alpha:g}")
    if max_len_b != cfg.eval.max_len_b:
        parts.append(f"lenb{max_len_b}")
    return "".join(f"_{p}" for p in parts)


def eval_run(
    run_dir: str | Path,
    split: str = "dev",
    beam: int | None = None,
    alpha: float | None = None,
    average: int | None = None,
    max_len_b: int | None = None,
    *,
    checkpoint: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Decode a split of the run's corpus and score it: sacreBLEU (+ signature), tokenized BLEU, PPL.

    Writes ``eval_<split>[_tag].json`` (the returned dict) and ``hyps_<split>[_tag].txt`` into the run folder.

    Args:
        run_dir: the run folder.
        split: ``dev`` or ``test``.
        beam: beam size (1 is greedy); None: the run's own ``eval.beam_size`` (the paper: 4).
        alpha: length penalty; None: the run's ``eval.alpha`` (the paper: 0.6).
        average: average the last K periodic checkpoints (the paper: 5 for base models; Table 3: none).
        max_len_b: output tokens beyond the source length; None: the run's ``eval.max_len_b`` (the paper: 50).
        checkpoint: use this checkpoint file instead of last.ckpt.
        device: ``cpu``, ``cuda``, ... (None: CUDA when present).
        precision: ``fp32`` or ``bf16`` autocast (None: as the run trained).
        progress: progress bar on stderr.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be one of dev, test, got {split!r}")
    run_dir = Path(run_dir)
    cfg, model, tokenizer = load_run(run_dir, average=average, checkpoint=checkpoint)
    beam, alpha, max_len_b = _decoding(cfg, beam, alpha, max_len_b)

    from transformer_lit.corpora import load_corpus
    from transformer_lit.decoding import translate
    from transformer_lit.metrics import perplexity, sacre_bleu, tokenized_bleu

    pairs = list(getattr(load_corpus(cfg.data), split))
    if not pairs:
        raise ValueError(f"the {split} split of {run_dir}'s corpus ({cfg.data.corpus}) is empty")
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    dev = _device(device)
    model.to(dev)
    start = time.perf_counter()
    with _autocast(cfg, dev, precision):
        hyps = translate(
            model, tokenizer, sources, beam_size=beam, alpha=alpha, max_len_b=max_len_b,
            batch_size=cfg.eval.batch_size, progress=progress,
        )  # fmt: skip
        decode_seconds = time.perf_counter() - start
        nll, ntok = teacher_forced_nll(model, tokenizer, pairs, batch_size=cfg.eval.batch_size)
    bleu, signature = sacre_bleu(hyps, refs)
    tag = _tag(cfg, beam, alpha, max_len_b, average, checkpoint)
    hyps_file, eval_file = run_dir / RF.hyps_name(split, tag), run_dir / RF.eval_name(split, tag)
    result: dict[str, Any] = {
        "split": split,
        "bleu": bleu,
        "bleu_tok": tokenized_bleu(hyps, refs, lang=cfg.data.tgt_lang),
        "sacrebleu_signature": signature,
        "ppl": perplexity(nll, ntok),
        "nll_sum": nll,
        "target_tokens": ntok,
        "sentences": len(pairs),
        "beam": beam,
        "alpha": alpha,
        "max_len_b": max_len_b,
        "average": average,
        "checkpoint": checkpoint or ("last" if average is None else f"mean of last {average}"),
        "device": str(dev),
        "precision": precision or cfg.train.precision,
        "decode_seconds": round(decode_seconds, 3),
        "hyps_file": hyps_file.name,
    }
    RF.write_atomic(hyps_file, "".join(h.replace("\n", " ") + "\n" for h in hyps))
    RF.write_atomic(eval_file, json.dumps(result, indent=2) + "\n")
    return result


def translate_lines(
    run_dir: str | Path,
    lines: Sequence[str],
    *,
    beam: int | None = None,
    alpha: float | None = None,
    max_len_b: int | None = None,
    average: int | None = None,
    checkpoint: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Translate source lines with a run's model; one output line per input line (empty stays empty).
    Decoding settings left None are the run's own (its config's ``eval`` section)."""
    from transformer_lit.decoding import translate

    cfg, model, tokenizer = load_run(run_dir, average=average, checkpoint=checkpoint)
    beam, alpha, max_len_b = _decoding(cfg, beam, alpha, max_len_b)
    dev = _device(device)
    model.to(dev)
    lines = [line.replace("\n", " ") for line in lines]
    with _autocast(cfg, dev, precision):
        return translate(
            model, tokenizer, lines, beam_size=beam, alpha=alpha, max_len_b=max_len_b,
            batch_size=batch_size or cfg.eval.batch_size, progress=progress,
        )  # fmt: skip


def average_run(run_dir: str | Path, last: int, out_file: str | Path) -> Path:
    """Average the last K periodic checkpoints of a run into ``out_file`` (a plain state dict).

    The file loads with ``transformer_lit.checkpoints.load_state_dict`` and ``Transformer.load_state_dict``.
    """
    from transformer_lit.checkpoints import average_checkpoints, save_state_dict

    run_dir = Path(run_dir)
    if not (run_dir / RF.CONFIG).is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {RF.CONFIG}")
    paths = _checkpoint_paths(run_dir, last, None)
    return save_state_dict(average_checkpoints(paths), out_file)
