"""Model weights from Lightning checkpoints, and checkpoint averaging (Section 6.1).

The paper evaluates base models on "a single model obtained by averaging the last 5 checkpoints, which were
written at 10-minute intervals" (big models: the last 20). Table 3 itself uses no averaging; averaging is a
switch for final models (``tlit eval --average K``, ``tlit average``).

A Lightning checkpoint holds the LightningModule's weights under ``"state_dict"`` with the Transformer's keys
prefixed ``model.``; ``load_state_dict`` returns them without the prefix, ready for
``Transformer.load_state_dict``. Files written by ``save_state_dict`` hold such a plain state dict and are
read back by the same ``load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from transformer_lit.atomic import atomic_path

log = logging.getLogger(__name__)

PREFIX = "model."


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The Transformer's weights from a Lightning ``.ckpt`` (or a file written by ``save_state_dict``).

    Loads with ``weights_only=True`` (no pickled code runs) onto the CPU. Keys lose their ``model.`` prefix;
    entries of the LightningModule outside the model (if any) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which, in one line
        raise ValueError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    if any(k.startswith(PREFIX) for k in state):
        dropped = [k for k in state if not k.startswith(PREFIX)]
        if dropped:
            log.debug("%s: ignoring %d non-model entries, e.g. %s", path, len(dropped), dropped[0])
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return state


def _check_same(ref: dict[str, Tensor], state: dict[str, Tensor], ref_name: str, name: str) -> None:
    """Raise a one-line ValueError unless ``state`` has the keys and shapes of ``ref``."""
    if state.keys() != ref.keys():
        diff = sorted(state.keys() ^ ref.keys())
        raise ValueError(f"checkpoint {name} has different parameters from {ref_name}: e.g. {diff[0]!r}")
    for key, value in state.items():
        if value.shape != ref[key].shape:
            raise ValueError(
                f"checkpoint {name}: {key} has shape {tuple(value.shape)}, "
                f"{ref_name} has {tuple(ref[key].shape)}"
            )


def _acc_dtype(value: Tensor) -> torch.dtype:
    # Sum in float32 (float64 stays float64) so averaging bf16/fp16 weights loses nothing but the final cast.
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def average_state_dicts(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of floating-point tensors; integer and bool buffers are taken from the last."""
    return _average((f"#{i}", lambda s=s: s) for i, s in enumerate(states))


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Tensor]:
    """Mean of the model weights of several checkpoints (the paper's checkpoint averaging).

    Files are read one at a time into a float accumulator, so averaging the paper's 20 big-model
    checkpoints holds two state dicts in memory, not twenty. Floating-point tensors are averaged; integer
    and bool buffers are taken from the last checkpoint.

    Raises:
        ValueError: no paths, or the checkpoints do not hold the same parameter names and shapes.
    """
    paths = [Path(p) for p in paths]
    if paths:
        log.info("averaging %d checkpoints: %s .. %s", len(paths), paths[0].name, paths[-1].name)
    return _average((str(p), lambda p=p: load_state_dict(p)) for p in paths)


def _average(sources: Iterable[tuple[str, Callable[[], dict[str, Tensor]]]]) -> dict[str, Tensor]:
    first: dict[str, Tensor] | None = None
    last: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}
    count = 0
    first_name = ""
    for name, load in sources:
        state = load()
        if first is None:
            first, first_name = state, name
            acc = {k: v.to(_acc_dtype(v)).clone() for k, v in state.items() if v.is_floating_point()}
        else:
            _check_same(first, state, first_name, name)
            for key in acc:
                acc[key] += state[key].to(acc[key].dtype)
        last = state
        count += 1
    if first is None:
        raise ValueError("average needs at least one checkpoint, got 0")
    out = {}
    for key, value in first.items():
        out[key] = (acc[key] / count).to(value.dtype) if key in acc else last[key].clone()
    return out


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> Path:
    """Write a plain state dict (``torch.save``) atomically and durably (``transformer_lit.atomic``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    return path
