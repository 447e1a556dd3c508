"""What a sweep found: best trials, parameter importances, Optuna's plots, and the best config as a grid file.

``tlit sweep FILE --report`` writes ``results/sweeps/<study>/report.md`` and the plots beside it, each as PNG
(``optuna.visualization.matplotlib``) and HTML (plotly, loading plotly.js from its CDN): optimisation
history, parameter importances, parallel coordinates, and for two objectives the Pareto front.
``--export-best`` writes ``best.yaml``, a grid file whose ``best`` row holds the best trial's values at the
paper's size (so ``tlit grid run`` can rerun it with more seeds at any scale that divides them).
"""

from __future__ import annotations

import logging
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from experiments.grids import grid as G
from experiments.runs import folder as RF
from experiments.sweeps import storage as sweep_storage
from experiments.sweeps.runner import counts, sweep_dir
from experiments.sweeps.space import SweepError, SweepSpec
from transformer_lit import config as C

log = logging.getLogger(__name__)

BEST_ROWS = 10


@dataclass
class Report:
    markdown: str
    files: list[Path] = field(default_factory=list)


def load_study(spec: SweepSpec, storage_url: str | None, sweeps_root: str | Path) -> optuna.Study:
    """The study of ``spec`` in its storage, or a one-line error when it has not run yet."""
    storage = sweep_storage.parse_storage(
        storage_url or sweep_storage.default_storage(sweeps_root, spec.study)
    )
    if storage.path is not None and not storage.path.is_file():
        raise SweepError(f"no study {spec.study!r} yet ({storage} not found); run: tlit sweep {spec.path}")
    sweep_storage.check_storage(storage)
    backend = sweep_storage.open_storage(
        storage,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=spec.grace_period,
        retries=spec.retries,
    )
    try:
        return optuna.load_study(study_name=spec.study, storage=backend)
    except KeyError:
        raise SweepError(f"no study {spec.study!r} in {storage}; run: tlit sweep {spec.path}") from None


def _targets(spec: SweepSpec) -> list[tuple[Callable[[FrozenTrial], float] | None, str]]:
    if len(spec.objectives) == 1:
        return [(None, spec.objectives[0])]
    return [(lambda t, i=i: t.values[i], name) for i, name in enumerate(spec.objectives)]


def make_report(spec: SweepSpec, study: optuna.Study, sweeps_root: str | Path) -> Report:
    out = sweep_dir(sweeps_root, spec)
    out.mkdir(parents=True, exist_ok=True)
    c = counts(study)
    s = spec.grid.scale(spec.scale)
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(spec.objectives, spec.directions, strict=True))
    lines = [
        f"# Sweep {spec.study} (scale {spec.scale})",
        "",
        *([spec.description, ""] if spec.description else []),
        f"File `{spec.path}`; objective {objectives}; sampler {spec.sampler}, pruner {spec.pruner}.",
        f"Trials: {c.finished}/{spec.budget} finished ({c.complete} complete, {c.pruned} pruned), "
        f"{c.failed} failed, {c.running} running, {c.waiting} waiting.",
    ]
    if s.divide > 1:
        lines.append(
            f"Sizes (d_model, d_ff, d_k, d_v) are at the trial's scale: the paper's divided by {s.divide}."
        )
    lines += ["", "## Best trials", "", *_best_table(spec, study), ""]
    lines += ["## Parameter importances", "", *_importances(spec, study), ""]
    files = _plots(spec, study, out)
    if files:
        lines += ["## Plots", "", *[f"- [{p.name}]({p.name})" for p in files], ""]
    report = out / "report.md"
    RF.write_atomic(report, "\n".join(lines))
    return Report("\n".join(lines), [report, *files])


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _best_table(spec: SweepSpec, study: optuna.Study) -> list[str]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return ["No complete trial yet."]
    if len(spec.objectives) == 1:
        sign = 1 if spec.directions[0] == "minimize" else -1
        best = sorted(done, key=lambda t: sign * t.value)[:BEST_ROWS]
    else:
        best = sorted(study.best_trials, key=lambda t: t.number)
    names = list(spec.params)
    head = ["trial", *spec.objectives, *names, "run folder"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in best:
        cells = [str(t.number), *map(_fmt, t.values), *(_fmt(t.params.get(n, "")) for n in names)]
        rows.append("| " + " | ".join([*cells, f"`{t.user_attrs.get('run_dir', '')}`"]) + " |")
    if len(spec.objectives) > 1:
        rows.append("\n(the Pareto front: no trial is better on every objective)")
    return rows


def _importances(spec: SweepSpec, study: optuna.Study) -> list[str]:
    out = []
    for (target, name), direction in zip(_targets(spec), spec.directions, strict=True):
        if target is not None and direction == "maximize":  # the evaluator ranks what makes a target low
            target = (lambda f: lambda t: -f(t))(target)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            out.append(f"{name}: not available ({' '.join(str(err).split())[:120]})")
            continue
        out += [f"{name}:", "", "| parameter | importance |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in imp.items()]
        out.append("")
    return out


def _plots(spec: SweepSpec, study: optuna.Study, out: Path) -> list[Path]:
    """PNG (matplotlib) and HTML (plotly) of each plot Optuna can draw for this study; skips what fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vmpl

    target, name = _targets(spec)[0]
    kinds: dict[str, tuple[str, dict[str, Any]]] = {
        "history": ("plot_optimization_history", {"target": target, "target_name": name}),
        "importances": ("plot_param_importances", {"target": target, "target_name": name}),
        "parallel": ("plot_parallel_coordinate", {"target": target, "target_name": name}),
    }
    if len(spec.objectives) > 1:
        kinds["pareto"] = ("plot_pareto_front", {"target_names": list(spec.objectives)})
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API warnings of optuna.visualization.matplotlib
        for stem, (fn, kwargs) in kinds.items():
            try:
                ax = getattr(vmpl, fn)(study, **kwargs)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                with RF.atomic_path(out / f"{stem}.png") as tmp:
                    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
                plt.close(fig)
                files.append(out / f"{stem}.png")
                with RF.atomic_path(out / f"{stem}.html") as tmp:
                    getattr(vis, fn)(study, **kwargs).write_html(tmp, include_plotlyjs="cdn")
                files.append(out / f"{stem}.html")
            except (ValueError, RuntimeError, ZeroDivisionError, ImportError) as err:
                log.info("no %s plot: %s", stem, err)
                plt.close("all")
    return files


# ----------------------------------------------------------------------------------------------------------
# The best configuration as a grid file


def best_trial(spec: SweepSpec, study: optuna.Study) -> FrozenTrial:
    """The best complete trial; with two objectives, the Pareto trial best on the first."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise SweepError(f"study {spec.study!r} has no complete trial yet")
    if len(spec.objectives) == 1:
        return study.best_trial
    sign = 1 if spec.directions[0] == "minimize" else -1
    return min(study.best_trials, key=lambda t: sign * t.values[0])


def best_cells(spec: SweepSpec, trial: FrozenTrial) -> dict[str, Any]:
    """The grid row of ``trial``: the base row's cells and every value that differs from it, at paper size."""
    base_row = spec.grid.row(spec.row)
    base = C.flat_dict(C.apply_overrides(C.base(), base_row.cells))
    values = {**trial.params, **spec.derived(trial.params, spec.base_config())}
    cells = dict(base_row.cells)
    for key, value in values.items():
        paper = spec.to_paper(key, value)
        if isinstance(paper, float):
            paper = round(paper, 4)
        if base[key] != paper:
            cells[key] = paper
    return cells


def export_best(spec: SweepSpec, study: optuna.Study, sweeps_root: str | Path) -> Path:
    """Write ``best.yaml``: rows ``best`` and the sweep's base row, with the scales that divide its cells."""
    t = best_trial(spec, study)
    base_row = spec.grid.row(spec.row)
    label = f"{spec.study} trial {t.number}"
    rows = {
        spec.row: G.Row(spec.row, base_row.label, dict(base_row.cells)),
        "best": G.Row("best", label, best_cells(spec, t)),
    }
    path = sweep_dir(sweeps_root, spec) / "best.yaml"
    grid = G.Grid(name=f"{spec.study}-best", path=path, rows=rows, scales=spec.grid.scales)
    scales, dropped = {}, []
    for name, scale in spec.grid.scales.items():
        try:
            for row in rows:
                grid.config(row, name)
            scales[name] = scale
        except G.GridError:
            dropped.append(name)
    values = ", ".join(f"{o}={v:.4g}" for o, v in zip(spec.objectives, t.values, strict=True))
    about = (
        f"The best trial of sweep {spec.study} ({spec.path}, scale {spec.scale}): trial {t.number}, {values};"
        " "
        f"written by `tlit sweep {spec.path} --export-best`. Cells are at the paper's size, as in "
        f"ablations/{spec.grid.path.name}; row {spec.row} is the sweep's starting point, for comparison."
    )
    if spec.fixed:
        fixed = ", ".join(f"{k}={v}" for k, v in spec.fixed.items())
        about += f" The sweep's fixed trial settings are not part of the row: {fixed}."
    if dropped:
        about += f" Scales {', '.join(dropped)} are left out: they do not divide the row's sizes."
    header = [f"# tlit grid run {path} --scale {spec.scale} --seeds 3", "#"]
    header += [f"# {line}" for line in textwrap.wrap(about, width=106)]
    doc = {
        "name": grid.name,
        "description": f"best configuration found by sweep {spec.study}",
        "default_scale": spec.scale,
        "scales": {
            n: {"description": s.description, "divide": s.divide, "steps": s.steps, "set": dict(s.set)}
            for n, s in scales.items()
        },
        "rows": {name: {"label": r.label, **r.cells} for name, r in rows.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    RF.write_atomic(path, "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, width=110))
    G.load_grid(path)  # what we wrote must load
    return path
