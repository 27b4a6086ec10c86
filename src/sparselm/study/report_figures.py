"""Draw the report's figures from `report_data.FigureData`, saved by the one figure writer of sparselm.analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..analysis.figures import plt, save_figure
from .report_data import FigureData, Line, Panel, Reference

PANEL_SIZE = (6.0, 4.2)
SINGLE_PANEL_WIDTH = 7.0
DPI = 100
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
    width = SINGLE_PANEL_WIDTH if count == 1 else PANEL_SIZE[0] * count
    fig, axes = plt.subplots(1, count, figsize=(width, PANEL_SIZE[1]), squeeze=False)
    for ax, panel in zip(axes[0], figure.panels):
        _draw_panel(ax, panel)
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
    ax.set_xlabel("sparsity")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_line(ax: plt.Axes, line: Line) -> None:
    xs = [p.x for p in line.points]
    ys = [p.y for p in line.points]
    if any(p.low is not None for p in line.points):
        below = [p.y - p.low if p.low is not None else 0.0 for p in line.points]
        above = [p.high - p.y if p.high is not None else 0.0 for p in line.points]
        ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=line.label)
    else:
        ax.plot(xs, ys, marker="o", label=line.label)


def _draw_reference(ax: plt.Axes, ref: Reference) -> None:
    ax.axhline(ref.value, label=ref.label or None, **REFERENCE_STYLES[ref.style])
    if ref.low is not None and ref.high is not None:
        ax.axhspan(ref.low, ref.high, color="grey", alpha=0.15, lw=0)
