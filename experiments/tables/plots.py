"""The table's three figures, PNG files beside it: our PPL change per row next to the paper's (grouped A-E),
PPL against parameter count, and the dev-PPL learning curves of every row (one panel per group).

matplotlib is imported here only (Agg backend, no display needed), so ``tlit table --no-plots`` and the
table code never pay its import.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.tables.build import Table

log = logging.getLogger(__name__)

BASE_ROW = "base"
DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOTS = ("ppl-change", "ppl-vs-params", "curves")
"""The figures' name suffixes: ``<stem>-<suffix>.png``."""


def plot_name(stem: str, suffix: str) -> str:
    return f"{stem}-{suffix}.png"


def render_plots(table: Table, stem: str) -> dict[str, bytes]:
    """The three figures as PNG bytes by file name (a figure with nothing to show is left out). Nothing is
    written here: ``tlit table`` writes every output of one call together, or none."""
    import io

    plt = _pyplot()
    draw = {"ppl-change": plot_ppl_change, "ppl-vs-params": plot_ppl_vs_params, "curves": plot_curves}
    images = {}
    for suffix in PLOTS:
        fig = draw[suffix](table, plt)
        if fig is None:
            log.info("%s: nothing to plot for %s", stem, suffix)
            continue
        buffer = io.BytesIO()
        # margins set by hand: bbox_inches="tight" and tight_layout cost a draw each
        fig.savefig(buffer, format="png", dpi=DPI)
        plt.close(fig)
        images[plot_name(stem, suffix)] = buffer.getvalue()
    return images


def plot_ppl_change(table: Table, plt: Any) -> Any:
    """Two bar charts sharing the rows: our dev-PPL change from our base (top), the paper's from its base
    (bottom), coloured by group. Scales differ (a tiny model's PPL moves more), directions should not."""
    frame = table.frame[table.frame["row"] != BASE_ROW]
    frame = frame[frame["d_ppl"].notna() | frame["paper_d_ppl"].notna()]
    if frame.empty:
        return None
    groups = list(dict.fromkeys(frame["group"]))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(frame)), 5.5), sharex=True)
    x = range(len(frame))
    for ax, col, title in ((axes[0], "d_ppl", f"ours ({table.scale})"), (axes[1], "paper_d_ppl", "paper")):
        values = [0.0 if math.isnan(v) else v for v in frame[col].astype(float)]
        ax.bar(x, values, color=[colors[g] for g in frame["group"]])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("ΔPPL vs base")
        ax.set_title(title, fontsize=10, loc="left")
    axes[1].set_xticks(list(x), list(frame["row"]), fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups]
    axes[0].legend(handles, groups, fontsize=7, ncol=len(groups), loc="upper left")
    fig.suptitle(f"{table.grid}: dev PPL change per row, ours vs the paper's")
    fig.subplots_adjust(left=0.09, right=0.98, top=0.88, bottom=0.08, hspace=0.22)
    return fig


def plot_ppl_vs_params(table: Table, plt: Any) -> Any:
    """Dev PPL against parameter count, ours (with the seed std as error bars) and the paper's."""
    frame = table.frame
    ours = frame[frame["params_m"].notna() & frame["ppl_dev"].notna()]
    paper = frame[frame["paper_params_m"].notna() & frame["paper_ppl"].notna()]
    if ours.empty and paper.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data, px, py, title in (
        (axes[0], ours, "params_m", "ppl_dev", f"ours ({table.scale})"),
        (axes[1], paper, "paper_params_m", "paper_ppl", "paper"),
    ):
        err = data["ppl_dev_std"].fillna(0) if py == "ppl_dev" else None
        ax.errorbar(data[px], data[py], yerr=err, fmt="o", markersize=4, capsize=2)
        for _, line in data.iterrows():
            ax.annotate(
                line["row"], (line[px], line[py]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("dev PPL")
        ax.set_title(title, fontsize=10, loc="left")
    fig.suptitle(f"{table.grid}: dev PPL vs parameter count")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.13, wspace=0.22)
    return fig


def _log_y(ax: Any) -> None:
    """Log scale labelled 2, 3, 5, 10, 20, ... (PPL falls from hundreds to a few), not 3x10^0."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))


def plot_curves(table: Table, plt: Any) -> Any:
    """Dev PPL against step, one panel per group; base dashed in every panel, one line per seed."""
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for rec in table.records:
        points = rec.curve()
        if points:
            curves.setdefault(rec.row, []).append(points)
    if not curves:
        return None
    group_of = dict(zip(table.frame["row"], table.frame["group"], strict=True))
    groups = list(dict.fromkeys(group_of[r] for r in table.frame["row"] if r in curves and r != BASE_ROW))
    groups = groups or [group_of.get(BASE_ROW, BASE_ROW)]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, group in zip(axes.flat, groups, strict=False):  # the grid may have a spare panel
        members = [r for r in table.frame["row"] if group_of[r] == group and r in curves and r != BASE_ROW]
        for i, row in enumerate([BASE_ROW, *members] if BASE_ROW in curves else members):
            base_style = {"color": "black", "linestyle": "--"}
            style = base_style if row == BASE_ROW else {"color": plt.cm.tab10(i % 10)}
            for j, points in enumerate(curves[row]):
                steps, ppl = zip(*points, strict=True)
                ax.plot(steps, ppl, linewidth=1, alpha=0.85, label=row if j == 0 else None, **style)
        _log_y(ax)
        ax.set_title(f"({group})" if len(group) == 1 else group, fontsize=10, loc="left")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev PPL")
    fig.suptitle(f"{table.grid} ({table.scale}): dev PPL learning curves")
    height = 3.2 * rows
    fig.subplots_adjust(
        left=0.07, right=0.99, top=1 - 0.8 / height, bottom=0.5 / height, hspace=0.45, wspace=0.06
    )
    return fig
