"""Sweep files: a search space over the Table 3 knobs, read from YAML and checked before any trial starts.

A sweep file (``ablations/sweeps/*.yaml``) reads like a grid row with ranges instead of values::

    # tlit sweep ablations/sweeps/heads_dk.yaml --workers 2
    study: heads_dk
    grid: table3                  # base grid and row: what the trials start from
    row: base
    scale: tiny
    objective: ppl_dev            # ppl_dev (minimise), bleu_dev (maximise), or [ppl_dev, bleu_dev]
    sampler: tpe                  # tpe | random | grid
    pruner: median                # median | successive_halving | none
    trials: 30
    params:
      model.num_heads: {choices: [1, 2, 4, 8, 16]}
      model.d_k: {low: 8, high: 128, log: true}
    fixed: {train.max_steps: 600}

**Scale.** ``params`` are given like grid cells, at the paper's size, and the scale shrinks them exactly as it
shrinks a grid row: d_model, d_ff, d_k and d_v are divided by the scale's ``divide`` (a range's bounds
rounded inwards, its step divided; a choice must divide exactly) and ``train.max_steps`` is multiplied by
its ``steps``. Optuna then samples at the trial's scale (at tiny, ``d_k`` 8..128 becomes 1..16), so no two
sampled values mean the same model; ``--export-best`` multiplies back to the paper's size. ``fixed`` and the
command line's overrides are literal values at the trial's scale, like ``tlit train`` overrides.

**Constraint** ``fixed_compute``: d_k = d_v = d_model / h (Table 3, rows A), derived from the sampled h.

Every check runs at load time, so bad input fails in one line before any trial. No torch here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from experiments.grids import grid as G
from experiments.grids.scale import SIZE_FIELDS, ScaleError
from experiments.sweeps.space import (
    CONSTRAINTS,
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    Param,
    SweepError,
    SweepSpec,
    make_pruner,
    make_sampler,
)
from transformer_lit import config as C

SPEC_KEYS = (
    "study",
    "description",
    "grid",
    "row",
    "scale",
    "objective",
    "sampler",
    "sampler_options",
    "pruner",
    "pruner_options",
    "trials",
    "constraint",
    "params",
    "fixed",
    "heartbeat",
    "retries",
)
PARAM_KEYS = ("type", "choices", "low", "high", "step", "log")
GRID_MAX_POINTS = 100_000


def sweeps_dir() -> Path:
    return G.grids_dir() / "sweeps"


def resolve_sweep_path(name_or_path: str | Path) -> Path:
    return G.resolve_yaml(name_or_path, sweeps_dir(), "sweep", SweepError)


def load_sweep(
    name_or_path: str | Path,
    *,
    scale: str | None = None,
    study: str | None = None,
    trials: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> SweepSpec:
    """Read and check a sweep file; the keyword arguments are the command line's (they win over the file)."""
    path = resolve_sweep_path(name_or_path)
    try:
        raw = G._read_yaml(path)
    except G.GridError as err:
        raise SweepError(str(err)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping with 'study' and 'params'")
    for key in raw:
        if key not in SPEC_KEYS:
            raise SweepError(f"{path}: unknown key {key!r}; allowed: {', '.join(SPEC_KEYS)}")
    try:
        grid = G.load_grid(raw.get("grid", G.DEFAULT_GRID))
        row = str(raw.get("row", "base"))
        grid.row(row)
        scale_name = str(scale or raw.get("scale") or grid.default_scale)
        grid.scale(scale_name)
    except G.GridError as err:
        raise SweepError(f"{path}: {err}") from None
    heartbeat = raw.get("heartbeat") or {}
    if not isinstance(heartbeat, dict) or set(heartbeat) - {"interval", "grace"}:
        raise SweepError(
            f"{path}: heartbeat must be a mapping with interval and grace (seconds), got {heartbeat!r}"
        )
    spec = SweepSpec(
        path=path,
        study=_study_name(path, study or raw.get("study") or path.stem),
        grid=grid,
        row=row,
        scale=scale_name,
        params={},
        objectives=_objectives(path, raw.get("objective", "ppl_dev")),
        sampler=_choice(path, "sampler", raw.get("sampler", "tpe"), SAMPLERS),
        sampler_options=_options(path, "sampler_options", raw.get("sampler_options")),
        pruner=_choice(path, "pruner", str(raw.get("pruner", "none" if _multi(raw) else "median")), PRUNERS),
        pruner_options=_options(path, "pruner_options", raw.get("pruner_options")),
        trials=_positive(path, "trials", trials if trials is not None else raw.get("trials", 20)),
        constraint=_constraint(path, raw.get("constraint")),
        fixed=_fields(path, "fixed", raw.get("fixed")),
        overrides=_fields(path, "command-line override", overrides),
        heartbeat_interval=_positive(path, "heartbeat.interval", heartbeat.get("interval", 10)),
        grace_period=_positive(path, "heartbeat.grace", heartbeat.get("grace", 60)),
        retries=_positive(path, "retries", raw.get("retries", 2), zero=True),
        description=str(raw.get("description", "")),
    )
    try:
        base = spec.base_config()
    except ValueError as err:
        raise SweepError(f"{path}: {err}") from None
    params = _params(path, raw.get("params"), spec)
    spec = dataclasses.replace(spec, params=params)
    _check(spec, base)
    return spec


def _study_name(path: Path, name: Any) -> str:
    name = str(name)
    if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise SweepError(
            f"{path}: study name {name!r} must be a plain folder name (no '/', spaces or leading '.')"
        )
    return name


def _multi(raw: dict) -> bool:
    return isinstance(raw.get("objective"), list) and len(raw["objective"]) > 1


def _objectives(path: Path, raw: Any) -> tuple[str, ...]:
    names = raw if isinstance(raw, list) else [raw]
    if not names or len(set(map(str, names))) != len(names):
        raise SweepError(
            f"{path}: objective must be one or two distinct of {', '.join(OBJECTIVES)}, got {raw!r}"
        )
    for name in names:
        _choice(path, "objective", name, tuple(OBJECTIVES))
    return tuple(str(n) for n in names)


def _choice(path: Path, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SweepError(f"{path}: unknown {key} {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def _options(path: Path, key: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: {key} must be a mapping of keyword arguments, got {raw!r}")
    return dict(raw)


def _positive(path: Path, key: str, value: Any, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise SweepError(
            f"{path}: {key} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}"
        )
    return value


def _constraint(path: Path, raw: Any) -> str | None:
    if raw in (None, "none"):
        return None
    return _choice(path, "constraint", raw, CONSTRAINTS)


def _fields(path: Path, what: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: {what} must be a mapping of config fields, got {raw!r}")
    known = set(C.field_names())
    for key in raw:
        if key not in known:
            raise SweepError(f"{path}: {what}: unknown config field {key!r} (fields look like model.d_k)")
    return dict(raw)


def _params(path: Path, raw: Any, spec: SweepSpec) -> dict[str, Param]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{path}: 'params' must be a non-empty mapping of config field -> range or choices")
    known = set(C.field_names())
    params = {}
    for name, body in raw.items():
        where = f"{path}: params.{name}"
        if name not in known:
            raise SweepError(f"{where}: unknown config field {name!r} (fields look like model.d_k)")
        if not isinstance(body, dict):
            raise SweepError(f"{where}: must be a mapping with choices, or low and high, got {body!r}")
        for key in body:
            if key not in PARAM_KEYS:
                raise SweepError(f"{where}: unknown key {key!r}; allowed: {', '.join(PARAM_KEYS)}")
        params[name] = _scaled(where, _param(where, name, body), spec)
    return params


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _param(where: str, name: str, body: dict[str, Any]) -> Param:
    kind = body.get("type")
    if kind not in (None, "categorical", "int", "float"):
        raise SweepError(f"{where}: unknown type {kind!r}; allowed: categorical, int, float")
    if "choices" in body or kind == "categorical":
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{where}: choices must be a non-empty list, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SweepError(f"{where}: choices repeat a value: {choices!r}")
        if set(body) - {"type", "choices"}:
            raise SweepError(f"{where}: give either choices or low/high/step/log, not both")
        return Param(name, "categorical", choices=tuple(choices))
    low, high, step, log = body.get("low"), body.get("high"), body.get("step"), bool(body.get("log", False))
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SweepError(f"{where}: {key} must be a number (or give choices), got {value!r}")
    if low > high:
        raise SweepError(f"{where}: empty range: low {low} > high {high}")
    if log and low <= 0:
        raise SweepError(f"{where}: a log scale needs positive bounds, got low {low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float) or step <= 0):
        raise SweepError(f"{where}: step must be a positive number, got {step!r}")
    if log and step is not None and step != 1:
        raise SweepError(f"{where}: a log scale takes no step (Optuna), got step {step}")
    if kind is None:
        kind = "int" if _is_int(low) and _is_int(high) and (step is None or _is_int(step)) else "float"
    if kind == "int" and not (_is_int(low) and _is_int(high) and (step is None or _is_int(step))):
        raise SweepError(f"{where}: an int range needs integer low, high and step, got {low}, {high}, {step}")
    return Param(name, kind, low=low, high=high, step=step, log=log)


def _scaled(where: str, p: Param, spec: SweepSpec) -> Param:
    """The parameter at the trial's scale (see the module docstring; the rule is ``scale.Scale``)."""
    s = spec.grid.scale(spec.scale)
    if not s.changes(p.name):
        return p
    try:
        if p.kind == "categorical":
            return dataclasses.replace(p, choices=s.choices(p.name, p.choices))
        if p.name in SIZE_FIELDS and p.kind != "int":
            raise SweepError(f"{where}: {p.name} is an integer size; give an int range")
        low, high, step = s.range(p.name, p.low, p.high, p.step)
    except ScaleError as err:
        raise SweepError(f"{where}: {err}") from None
    return dataclasses.replace(p, low=low, high=high, step=step)


def _check(spec: SweepSpec, base: C.RunConfig) -> None:
    """Everything that can be known before a trial: values valid for the config, constraint, options."""
    path = spec.path
    if base.train.devices != 1:
        raise SweepError(
            f"{path}: trials run on one device each (train.devices=1, got {base.train.devices}); "
            "use --workers to use more devices"
        )
    for name, p in spec.params.items():
        for where, values in (("the command line", spec.overrides), ("fixed", spec.fixed)):
            if name in values:
                raise SweepError(f"{path}: {name} is swept (params) and also set in {where}")
        values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        if p.kind == "float":
            values.append(p.low + (p.high - p.low) / 3)  # an int field refuses a fractional value
        for value in values:
            try:
                C.apply_overrides(base, {name: value})
            except ValueError as err:
                raise SweepError(f"{path}: params.{name}: {err}") from None
    if spec.constraint == "fixed_compute":
        for key in ("model.d_k", "model.d_v"):
            if key in spec.params:
                raise SweepError(
                    f"{path}: {key} is derived from h under constraint fixed_compute; remove it from params"
                )
        h = spec.params.get("model.num_heads")
        if "model.d_model" not in spec.params:
            heads = [base.model.num_heads] if h is None else h.grid_values()
            bad = [x for x in heads if base.model.d_model % x]
            if bad:
                raise SweepError(
                    f"{path}: fixed_compute needs every h to divide d_model={base.model.d_model} at scale "
                    f"{spec.scale}; h={bad[0]} does not"
                )
    if len(spec.objectives) > 1 and spec.pruner != "none":
        raise SweepError(
            f"{path}: pruning needs a single objective; set pruner: none for {list(spec.objectives)}"
        )
    if spec.objectives[0] == "bleu_dev" and spec.pruner != "none" and not base.eval.bleu_every_n_steps:
        raise SweepError(
            f"{path}: pruning a bleu_dev sweep watches val/bleu; "
            "set eval.bleu_every_n_steps in fixed, or pruner: none"
        )
    if spec.sampler == "grid":
        try:
            points = math.prod(len(p.grid_values()) for p in spec.params.values())
        except SweepError as err:
            raise SweepError(f"{path}: {err}") from None
        if points > GRID_MAX_POINTS:
            raise SweepError(f"{path}: the grid sampler would visit {points} points; give fewer values")
    make_sampler(spec, seed=0)
    make_pruner(spec)
