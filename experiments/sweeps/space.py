"""The search space of a sweep and what Optuna makes of it: parameters, the spec, samplers and pruners.

A ``SweepSpec`` is a checked sweep file (``sweep_file.load_sweep``) with the command line's choices applied.
Its parameters are already at the trial's scale (see ``sweep_file``); ``to_paper`` maps a trial's value back
to the paper's size for exported grid rows. The constraint ``fixed_compute`` derives d_k = d_v = d_model / h
(Table 3, rows A) from the sampled h. No torch here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from experiments.grids import grid as G
from experiments.runs.folder import RUNTIME_FIELDS
from transformer_lit import config as C

OBJECTIVES = {"ppl_dev": "minimize", "bleu_dev": "maximize"}
MONITORS = {"ppl_dev": "val/ppl", "bleu_dev": "val/bleu"}
"""What the pruning callback watches during training, per objective (dev PPL at every validation)."""
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "none")
CONSTRAINTS = ("fixed_compute",)


class SweepError(ValueError):
    """A malformed sweep file or option; the message is one line naming the file, the key and the value."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space, at the trial's scale.

    Attributes:
        name: The config field it sets, ``section.field``.
        kind: ``categorical``, ``int`` or ``float``.
        choices: The values of a categorical parameter.
        low, high, step, log: The range of a numeric one (Optuna's meaning).
    """

    name: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step or 1)
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """Every value, for the grid sampler (categorical, int, or float with a step)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "float" and self.step is None:
            raise SweepError(
                f"params.{self.name}: the grid sampler needs choices or a step, not a continuous range"
            )
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass(frozen=True)
class SweepSpec:
    """A loaded, checked sweep file, with the command line's scale, study, trials and overrides applied."""

    path: Path
    study: str
    grid: G.Grid
    row: str
    scale: str
    params: dict[str, Param]
    objectives: tuple[str, ...] = ("ppl_dev",)
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    trials: int = 20
    constraint: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: int = 10
    grace_period: int = 60
    retries: int = 2
    description: str = ""

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def monitor(self) -> str:
        return MONITORS[self.objectives[0]]

    @property
    def budget(self) -> int:
        """Trials to finish (complete or pruned): ``trials``, or fewer when a grid has fewer points."""
        return min(self.trials, len(self.grid_points())) if self.sampler == "grid" else self.trials

    def base_config(self, extra: dict[str, Any] | list[str] | None = None) -> C.RunConfig:
        """The config every trial starts from: base row at the scale, then ``fixed``, overrides, ``extra``."""
        cfg = self.grid.config(self.row, self.scale, 0, {**self.fixed, **self.overrides})
        return C.apply_overrides(cfg, extra or {})

    def derived(self, values: dict[str, Any], cfg: C.RunConfig) -> dict[str, Any]:
        """Config values implied by the constraint (fixed_compute: d_k = d_v = d_model / h)."""
        if self.constraint != "fixed_compute":
            return {}
        d_model = values.get("model.d_model", cfg.model.d_model)
        h = values.get("model.num_heads", cfg.model.num_heads)
        if d_model % h:
            raise SweepError(
                f"{self.path}: fixed_compute needs h to divide d_model, got h={h}, d_model={d_model}"
            )
        return {"model.d_k": d_model // h, "model.d_v": d_model // h}

    def trial_values(
        self, trial: optuna.Trial, extra: dict[str, Any] | list[str] | None = None
    ) -> dict[str, Any]:
        """Ask ``trial`` for every parameter; returns the config overrides of the trial (derived ones too)."""
        values = {name: p.suggest(trial) for name, p in self.params.items()}
        return {**values, **self.derived(values, self.base_config(extra))}

    def config(self, values: dict[str, Any], extra: dict[str, Any] | list[str] | None = None) -> C.RunConfig:
        try:
            return C.apply_overrides(self.base_config(extra), values)
        except ValueError as err:
            raise SweepError(f"{self.path}: {err}") from None

    def grid_points(self) -> list[tuple[Any, ...]]:
        return list(itertools.product(*(p.grid_values() for p in self.params.values())))

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs of this file the same study (stored with the study, compared on load); the
        run-time fields say where a trial runs, not what it is, so they are left out."""
        base = {k: v for k, v in C.flat_dict(self.base_config()).items() if k not in RUNTIME_FIELDS}
        return {
            "grid": self.grid.name,
            "row": self.row,
            "scale": self.scale,
            "objectives": list(self.objectives),
            "constraint": self.constraint,
            "params": {
                n: optuna.distributions.distribution_to_json(p.distribution()) for n, p in self.params.items()
            },
            "base": base,
        }

    def to_paper(self, key: str, value: Any) -> Any:
        """A trial-scale value at the paper's size (the inverse of the scale, for exported grid rows)."""
        return self.grid.scale(self.scale).invert(key, value)


# ----------------------------------------------------------------------------------------------------------
# Samplers and pruners


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` after the last point: our workers stop on their
    own budget (``SweepSpec.budget`` caps the trials at the grid's size), and ``stop`` outside
    ``study.optimize`` raises."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The file's sampler; ``seed`` differs per worker, so parallel workers do not draw the same points."""
    options = dict(spec.sampler_options)
    if seed is not None and "seed" in options:
        options["seed"] = int(options["seed"]) + seed
    try:
        if spec.sampler == "tpe":
            return optuna.samplers.TPESampler(**options)
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(**options)
        space = {name: p.grid_values() for name, p in spec.params.items()}
        return _GridSampler(space, **options)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{spec.path}: sampler_options for {spec.sampler}: {err}") from None


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """Median or successive halving; steps are optimizer steps (the trainer reports at every validation)."""
    try:
        if spec.pruner == "median":
            return optuna.pruners.MedianPruner(**spec.pruner_options)
        if spec.pruner == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**spec.pruner_options)
        if spec.pruner_options:
            raise ValueError("pruner none takes no options")
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as err:
        raise SweepError(f"{spec.path}: pruner_options for {spec.pruner}: {err}") from None
