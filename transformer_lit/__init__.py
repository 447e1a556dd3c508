"""transformer_lit: a paper-faithful Transformer (Vaswani et al. 2017) and its Table 3 knobs, on Lightning.

The package root imports no torch: configs and parameter counts are usable by table and planning code that
must stay fast. ``build_model`` and ``Transformer`` are imported lazily.
"""

from __future__ import annotations

from typing import Any

from transformer_lit.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from transformer_lit.params import count_parameters

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "Transformer",
    "build_model",
    "count_parameters",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("build_model", "Transformer"):
        from transformer_lit import model

        return getattr(model, name)
    raise AttributeError(f"module 'transformer_lit' has no attribute {name!r}")
