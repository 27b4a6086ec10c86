"""Draw the report's figures from `report_data.FigureData`, saved by the one figure writer of sparselm.analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..analysis.figures import plt, save_figure
from .report_data import FigureData, Line, Panel, Reference

PANEL_SIZE = (6.0, 4.2)
SINGLE_PANEL_WIDTH = 7.0
DPI = 100
LINE_STYLES = {
    "solid": {"marker": "o"},
    "dashed": {"marker": "o", "ls": "--", "alpha": 0.8},
    "points": {"marker": "o", "ls": "none"},
    "front": {"color": "black", "lw": 1.5, "alpha": 0.6, "marker": "o", "ms": 12, "mfc": "none"},
}
REFERENCE_STYLES = {
    "dense": {"color": "black", "ls": "--", "lw": 1},
    "file": {"color": "grey", "ls": ":", "lw": 1},
    "unity": {"color": "grey", "ls": ":", "lw": 1},
}


def draw_figure(figure: FigureData, figs: Path) -> Path:
    """The figure's PNG in `figs`: copied when another command drew it, else drawn panel by panel."""
    path = figs / figure.name
    if figure.source is not None:
        shutil.copyfile(figure.source, path)
        return path
    count = len(figure.panels)
    columns = min(figure.columns or count, count)
    rows = -(-count // columns)
    width = SINGLE_PANEL_WIDTH if count == 1 else PANEL_SIZE[0] * columns
    fig, axes = plt.subplots(rows, columns, figsize=(width, PANEL_SIZE[1] * rows), squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, figure.panels):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return save_figure(fig, path, dpi=DPI)


def _draw_panel(ax: plt.Axes, panel: Panel) -> None:
    for line in panel.lines:
        _draw_line(ax, line)
    for ref in panel.references:
        _draw_reference(ax, ref)
    if panel.log_y:
        ax.set_yscale("log")
    bottom, top = panel.y_range
    if bottom is not None or top is not None:
        ax.set_ylim(bottom=bottom, top=top)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_line(ax: plt.Axes, line: Line) -> None:
    xs = [p.x for p in line.points]
    ys = [p.y for p in line.points]
    style = {**LINE_STYLES[line.style], **({"color": f"C{line.colour % 10}"} if line.colour is not None else {})}
    yerr = _spread([p.y for p in line.points], [(p.low, p.high) for p in line.points])
    xerr = _spread(xs, [(p.x_low, p.x_high) for p in line.points])
    if yerr is not None or xerr is not None:
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, capsize=3, label=line.label, **style)
    else:
        ax.plot(xs, ys, label=line.label, **style)
    for p in line.points:
        if p.note:
            ax.annotate(p.note, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _spread(values: list[float], bounds: list[tuple[float | None, float | None]]) -> list[list[float]] | None:
    """Error-bar lengths below and above each value, or None when no value has a spread."""
    if all(low is None for low, _ in bounds):
        return None
    below = [v - low if low is not None else 0.0 for v, (low, _) in zip(values, bounds)]
    above = [high - v if high is not None else 0.0 for v, (_, high) in zip(values, bounds)]
    return [below, above]


def _draw_reference(ax: plt.Axes, ref: Reference) -> None:
    if ref.vertical:
        ax.axvline(ref.value, label=ref.label or None, **REFERENCE_STYLES[ref.style])
        return
    ax.axhline(ref.value, label=ref.label or None, **REFERENCE_STYLES[ref.style])
    if ref.low is not None and ref.high is not None:
        ax.axhspan(ref.low, ref.high, color="grey", alpha=0.15, lw=0)
