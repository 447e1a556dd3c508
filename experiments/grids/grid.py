"""Grid files: rows that say what differs from base, scales that say how big base is, expanded into runs.

A grid file (``ablations/*.yaml``) reads like the paper's table::

    # tlit grid run ablations/table3.yaml --scale tiny
    name: table3
    scales: scales.yaml            # a file beside this one, or an inline mapping
    rows:
      base: {label: base}
      B1: {label: "d_k=16", model.d_k: 16}

A row lists only the cells that differ from the paper's base model, at the paper's sizes. A scale then
says how big base is and how long it trains (``divide``, ``steps``, ``set``: the rule is ``scale.Scale``).
Command-line overrides come last. No torch import: planning and tables stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.grids.scale import Scale, ScaleError
from transformer_lit import config as C

ROW_KEYS = ("label",)
SCALE_KEYS = ("description", "notes", "divide", "steps", "set")
GRID_KEYS = ("name", "description", "scales", "rows", "default_scale")
DEFAULT_GRID = "table3"


class GridError(ValueError):
    """A malformed grid file or an unknown row/scale; the message is one line naming file, row and field."""


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    cells: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    rows: dict[str, Row]
    scales: dict[str, Scale]
    description: str = ""
    default_scale: str = "tiny"

    def row(self, name: str) -> Row:
        if name not in self.rows:
            raise GridError(f"{self.path}: unknown row {name!r}; rows are: {', '.join(self.rows)}")
        return self.rows[name]

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise GridError(f"{self.path}: unknown scale {name!r}; scales are: {', '.join(self.scales)}")
        return self.scales[name]

    def config(
        self, row: str, scale: str, seed: int = 0, overrides: dict[str, Any] | None = None
    ) -> C.RunConfig:
        """The resolved config of one run: base, then the scale's settings, the row's cells, the scale's
        division and step factor, the seed, and finally the user's overrides."""
        r, s = self.row(row), self.scale(scale)
        try:
            cfg = s.apply(C.apply_overrides(C.base(), {**s.set, **r.cells}))
            return C.apply_overrides(cfg, {"train.seed": seed, **(overrides or {})})
        except ValueError as err:
            raise GridError(f"{self.path}: row {row}, scale {scale}: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Loading


def grids_dir() -> Path:
    """The repository's ``ablations/`` folder (the project is installed editable), else ``./ablations``."""
    here = Path(__file__).resolve().parents[2] / "ablations"
    return here if here.is_dir() else Path.cwd() / "ablations"


def resolve_yaml(
    name_or_path: str | Path, folder: Path, kind: str = "grid", error: type[ValueError] = GridError
) -> Path:
    """``table3`` or ``ablations/table3.yaml`` -> an existing path, or a one-line error listing what
    ``folder`` holds (``kind`` names it: grid, sweep)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "scales")
    raise error(f"{kind} {str(name_or_path)!r} not found; {kind}s in {folder}: {', '.join(known)}")


def resolve_grid_path(name_or_path: str | Path) -> Path:
    return resolve_yaml(name_or_path, grids_dir())


def load_grid(name_or_path: str | Path) -> Grid:
    path = resolve_grid_path(name_or_path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file must be a mapping with 'name' and 'rows'")
    _check_keys(raw, GRID_KEYS, f"{path}: unknown top-level key")
    name = raw.get("name") or path.stem
    rows = _load_rows(path, raw.get("rows"))
    scales = _load_scales(path, raw.get("scales", "scales.yaml"))
    grid = Grid(
        name=str(name),
        path=path,
        rows=rows,
        scales=scales,
        description=str(raw.get("description", "")),
        default_scale=str(raw.get("default_scale", "tiny")),
    )
    for row in rows:  # validate every row at every scale before anything runs
        for scale in scales:
            grid.config(row, scale)
    return grid


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key used twice in one mapping (plain YAML keeps the last silently).

    YAML merge keys (``<<: *anchor``) still work, so one scale can build on another's settings; a key set
    explicitly next to a merge overrides the merged value, as YAML specifies."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise GridError(f"name {key!r} used twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except GridError as err:
        raise GridError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def _check_keys(mapping: dict, allowed: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise GridError(f"{what} {key!r}; allowed: {', '.join(allowed)}")


def _load_rows(path: Path, raw: Any) -> dict[str, Row]:
    if not isinstance(raw, dict) or not raw:
        raise GridError(f"{path}: 'rows' must be a non-empty mapping of row name -> cells")
    rows: dict[str, Row] = {}
    known = set(C.field_names())
    for name, cells in raw.items():
        cells = dict(cells or {})
        label = str(cells.pop("label", name))
        for key in cells:
            if key not in known:
                raise GridError(
                    f"{path}: row {name}: unknown config field {key!r} (fields look like model.d_k)"
                )
        rows[str(name)] = Row(name=str(name), label=label, cells=cells)
    return rows


def _load_scales(path: Path, raw: Any) -> dict[str, Scale]:
    if isinstance(raw, str):
        scales_path = path.parent / raw
        if not scales_path.is_file():
            raise GridError(f"{path}: scales file {scales_path} not found")
        raw = _read_yaml(scales_path)
        path = scales_path
    if not isinstance(raw, dict) or not raw:
        raise GridError(f"{path}: 'scales' must be a non-empty mapping of scale name -> settings")
    scales = {}
    known = set(C.field_names())
    for name, values in raw.items():
        values = values or {}
        _check_keys(values, SCALE_KEYS, f"{path}: scale {name}: unknown key")
        settings = dict(values.get("set") or {})
        for key in settings:
            if key not in known:
                raise GridError(f"{path}: scale {name}: unknown config field {key!r}")
        notes = values.get("notes") or []
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise GridError(f"{path}: scale {name}: notes must be a list of strings, got {notes!r}")
        try:
            scales[str(name)] = Scale(
                name=str(name),
                divide=values.get("divide", 1),
                steps=values.get("steps", 1.0),
                set=settings,
                description=str(values.get("description", "")),
                notes=tuple(notes),
            )
        except ScaleError as err:
            raise GridError(f"{path}: scale {name}: {err}") from None
    return scales


# ----------------------------------------------------------------------------------------------------------
# Expansion into runs


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: where it goes and its fully resolved config."""

    grid: str
    scale: str
    row: str
    seed: int
    label: str
    config: C.RunConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.grid}/{self.scale}/{self.row}/seed{self.seed}"


def run_dir_for(runs_root: str | Path, grid: str, scale: str, row: str, seed: int) -> Path:
    return Path(runs_root) / grid / scale / row / f"seed{seed}"


def expand(
    grid: Grid,
    scale: str,
    *,
    rows: list[str] | None = None,
    seeds: int | list[int] = 1,
    overrides: dict[str, Any] | None = None,
    runs_root: str | Path = "results/runs",
) -> list[RunSpec]:
    """Rows x seeds -> RunSpecs, in the grid's row order."""
    grid.scale(scale)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    specs = []
    for row in rows or list(grid.rows):
        label = grid.row(row).label
        for seed in seed_list:
            cfg = grid.config(row, scale, seed, overrides)
            run_dir = run_dir_for(runs_root, grid.name, scale, row, seed)
            specs.append(RunSpec(grid.name, scale, row, seed, label, cfg, run_dir))
    return specs
