"""Figures of weight distributions, drawn from the streamed histograms (never from a copy of the weights)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; modules drawing figures import `plt` from here
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..io import atomic_write_bytes  # noqa: E402
from .distribution import Distribution  # noqa: E402
from .stats import Histogram, bin_upper_edges, cdf_from_counts  # noqa: E402


def _title(dist: Distribution, what: str) -> str:
    note = f"\n({dist.source_note}: values sit on the quantiser's grid)" if dist.source_note else ""
    return f"{dist.model}: {what}{note}"


def save_figure(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically and close it (every figure sparselm draws is saved through here)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _cumulative_at(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many |w| ≤ x, spreading each bin's count evenly over its (lower, upper] interval."""
    edges = bin_upper_edges()
    finite = np.isfinite(edges)
    return np.interp(x, edges[finite], np.cumsum(counts)[finite])


def linear_histogram(hist: Histogram, limit: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of w in `bins` equal bins over [-limit, limit], redistributed from the fine log-spaced bins."""
    edges = np.linspace(-limit, limit, bins + 1)
    pos, neg = hist.positive.numpy(), hist.negative.numpy()
    zeros = pos[0] + neg[0]
    pos, neg = pos.copy(), neg.copy()
    pos[0] = neg[0] = 0
    upper = np.maximum(edges[1:], 0.0)
    lower = np.maximum(edges[:-1], 0.0)
    counts = _cumulative_at(pos, upper) - _cumulative_at(pos, lower)
    counts += _cumulative_at(neg, np.maximum(-edges[:-1], 0.0)) - _cumulative_at(neg, np.maximum(-edges[1:], 0.0))
    counts[np.searchsorted(edges, 0.0, side="right") - 1] += zeros
    return edges, counts


def weight_histogram_figure(dist: Distribution, path: Path, bins: int = 201) -> None:
    """Histogram of w over the central 99.9% of |w| (log counts), the tails summarised in the legend."""
    limit = float(dist.overall["abs_quantiles"]["0.999"]) * 1.25 or 1.0
    edges, counts = linear_histogram(dist.overall_hist, limit, bins)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts, edges, fill=True, color="#3b6ea5")
    ax.set_yscale("log")
    ax.set_xlabel("weight value w")
    ax.set_ylabel("count (log scale)")
    outside = 1.0 - counts.sum() / max(1, dist.overall["count"])
    ax.set_title(_title(dist, "weight distribution"))
    ax.legend([f"{dist.overall['count']:,} weights; {outside:.3%} beyond ±{limit:.3g}"], loc="upper right", fontsize=8)
    save_figure(fig, path)


def _plot_cdf(ax: plt.Axes, abs_counts: torch.Tensor, **kwargs: object) -> None:
    edges, cdf = cdf_from_counts(abs_counts)
    nonzero = edges > 0
    ax.plot(np.log2(edges[nonzero]), cdf[nonzero], drawstyle="steps-post", **kwargs)


def _style_cdf_axes(ax: plt.Axes) -> None:
    ax.set_xlabel("log2 |w|")
    ax.set_ylabel("fraction of weights with |w| ≤ x")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)


def weight_cdf_figure(dist: Distribution, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_cdf(ax, dist.overall_hist.abs_counts, color="#3b6ea5")
    for q in ("0.5", "0.9", "0.99"):
        x = dist.overall["abs_quantiles"][q]
        if x > 0:
            ax.axvline(np.log2(x), color="grey", lw=0.7, ls=":")
            ax.text(np.log2(x), 0.02, f"q{q}", rotation=90, fontsize=7, color="grey")
    _style_cdf_axes(ax)
    ax.set_title(_title(dist, "CDF of |w|, all analysed matrices"))
    save_figure(fig, path)


def layer_cdf_figure(dist: Distribution, path: Path) -> None:
    """One CDF per block coloured by depth; encoder and decoder in separate panels for encoder-decoder models."""
    sides = sorted({side for side, _ in dist.block_abs_counts}, key=lambda s: 0 if s == "encoder" else 1)
    fig, axes = plt.subplots(1, len(sides), figsize=(7 * len(sides), 4), squeeze=False)
    for ax, side in zip(axes[0], sides):
        blocks = sorted(b for s, b in dist.block_abs_counts if s == side)
        cmap = plt.get_cmap("viridis")
        for i, b in enumerate(blocks):
            _plot_cdf(ax, dist.block_abs_counts[(side, b)], color=cmap(i / max(1, len(blocks) - 1)), lw=1)
        _style_cdf_axes(ax)
        ax.set_title(f"{side} blocks (dark = first, yellow = last)" if len(sides) > 1 else "per block")
        norm = matplotlib.colors.Normalize(vmin=0, vmax=max(blocks) if blocks else 1)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="block index")
    fig.suptitle(_title(dist, "CDF of |w| per transformer block"), fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def compare_cdf_figure(dists: list[Distribution], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for dist in dists:
        label = f"{dist.model} ({dist.source_note})" if dist.source_note else dist.model
        _plot_cdf(ax, dist.overall_hist.abs_counts, label=label)
    _style_cdf_axes(ax)
    ax.legend(fontsize=8)
    ax.set_title("CDF of |w| across models")
    save_figure(fig, path)


def write_model_figures(dist: Distribution, out: Path, slug: str) -> list[Path]:
    paths = [
        out / f"{slug}-weight-distribution.png",
        out / f"{slug}-weight-cdf.png",
        out / f"{slug}-layer-cdf.png",
    ]
    weight_histogram_figure(dist, paths[0])
    weight_cdf_figure(dist, paths[1])
    layer_cdf_figure(dist, paths[2])
    return paths
