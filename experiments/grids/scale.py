"""A scale: how big the paper's model is made and how long it trains. The one owner of the scale rule.

Grid rows and sweep parameters are written at the paper's size; a scale turns them into the run's size::

    tiny: {divide: 8, steps: 0.007, set: {data.corpus: synthetic, ...}}

- ``divide`` shrinks the sizes d_model, d_ff, d_k and d_v by one factor, exactly (h, N, P_drop and eps_ls
  are kept, so every Table 3 row keeps its meaning);
- ``steps`` multiplies ``train.max_steps`` (at least 1 step), so "big" still trains 3x longer than base;
- ``set`` fixes everything else (corpus, batch, warm-up).

Grids apply it to a config (``apply``), sweeps to a parameter's choices and ranges (``choices``, ``range``),
and exported sweep rows go back to the paper's size (``invert``). No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformer_lit import config as C

SIZE_FIELDS = ("model.d_model", "model.d_ff", "model.d_k", "model.d_v")
"""Divided by ``divide``."""
STEPS_FIELD = "train.max_steps"
"""Multiplied by ``steps``."""


class ScaleError(ValueError):
    """A value the scale cannot map (a size not divisible by ``divide``); one line naming field and value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Scale:
    """One scale of a grid file (``scales.yaml``)."""

    name: str
    divide: int = 1
    steps: float = 1.0
    set: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    notes: tuple[str, ...] = ()
    """What results at this scale can and cannot show; printed under its tables."""

    def __post_init__(self) -> None:
        if not _is_int(self.divide) or self.divide < 1:
            raise ScaleError(f"divide must be a positive integer, got {self.divide!r}")
        steps = self.steps
        if (
            isinstance(steps, bool)
            or not isinstance(steps, int | float)
            or not math.isfinite(steps)
            or steps <= 0
        ):
            raise ScaleError(f"steps must be a positive number, got {steps!r}")
        object.__setattr__(self, "steps", float(steps))

    def changes(self, key: str) -> bool:
        """Whether this scale maps ``key`` to another value at all."""
        return (key in SIZE_FIELDS and self.divide > 1) or (key == STEPS_FIELD and self.steps != 1.0)

    def value(self, key: str, value: Any) -> Any:
        """A paper-size value at this scale: a size divided exactly, steps multiplied, anything else kept."""
        if key in SIZE_FIELDS:
            d = self.divide
            if not _is_int(value) or value % d or value // d < 1:
                raise ScaleError(f"{key}={value} is not divisible by the scale's divide={d}")
            return value // d
        if key == STEPS_FIELD:
            return self._steps(value)
        return value

    def apply(self, cfg: C.RunConfig) -> C.RunConfig:
        """``cfg`` (at the paper's size) at this scale."""
        flat = C.flat_dict(cfg)
        return C.apply_overrides(cfg, {k: self.value(k, flat[k]) for k in (*SIZE_FIELDS, STEPS_FIELD)})

    def choices(self, key: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """A sweep's choices at this scale: sizes must divide exactly; equal step counts merge into one."""
        if key in SIZE_FIELDS:
            bad = [c for c in values if not _is_int(c) or c % self.divide or c < self.divide]
            if bad:
                raise ScaleError(
                    f"choice {bad[0]!r} is not divisible by scale {self.name}'s divide={self.divide}"
                )
            return tuple(c // self.divide for c in values)
        if key == STEPS_FIELD:
            return tuple(dict.fromkeys(self._steps(c) for c in values))
        return values

    def range(self, key: str, low: float, high: float, step: float | None) -> tuple[Any, Any, Any]:
        """A sweep's range at this scale: a size's bounds rounded inwards and its step divided (exactly);
        a step count's bounds and step multiplied. A step of 1 (or none) stays none."""
        if key in SIZE_FIELDS:
            d = self.divide
            new_step = None
            if step not in (None, 1):
                if step % d:
                    raise ScaleError(f"step {step} is not divisible by scale {self.name}'s divide={d}")
                new_step = step // d
            new_low, new_high = max(1, -(-int(low) // d)), int(high) // d
            if new_low > new_high:
                raise ScaleError(
                    f"empty at scale {self.name} (divide={d}): {low}..{high} -> {new_low}..{new_high}"
                )
            return new_low, new_high, new_step
        if key == STEPS_FIELD:
            new_step = None if step in (None, 1) else self._steps(step)
            return self._steps(low), self._steps(high), new_step
        return low, high, step

    def invert(self, key: str, value: Any) -> Any:
        """A value at this scale back at the paper's size (for grid rows exported from a sweep)."""
        if key in SIZE_FIELDS:
            return int(value) * self.divide
        if key == STEPS_FIELD:
            return max(1, round(value / self.steps))
        return value

    def _steps(self, value: float) -> int:
        return max(1, round(value * self.steps))
