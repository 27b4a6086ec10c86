"""Weight-distribution analysis: streamed exact statistics, tables and figures."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from ..facts import STATS_JSON
from ..io import atomic_dir, atomic_write_json, atomic_write_text, ensure_writable_dir
from ..models import load_with_source
from ..progress import SILENT, Progress
from ..sources import model_slug
from .distribution import Distribution, layers_csv, measure_distribution

__all__ = ["COMPARE_FIGURE", "Distribution", "analyze_models", "measure_distribution", "write_distribution"]
COMPARE_FIGURE = "compare-weight-cdf.png"


def write_distribution(dist: Distribution, out: Path, slug: str, force: bool = False) -> Path:
    """Write stats.json, layers.csv and the three figures into out/slug, all or nothing (replacing a directory
    sparselm did not write only with `force`)."""
    from .figures import write_model_figures  # matplotlib is imported only when figures are drawn (pruning is not)

    with atomic_dir(out / slug, force) as tmp:
        atomic_write_json(tmp / STATS_JSON, dist.to_json())
        atomic_write_text(tmp / "layers.csv", layers_csv(dist))
        write_model_figures(dist, tmp, slug)
    return out / slug


def analyze_models(
    names: list[str],
    out: Path,
    include_embeddings: bool = False,
    progress: Progress = SILENT,
    force: bool = False,
) -> dict[str, Any]:
    """Analyse each model in turn (one in memory at a time); returns a summary for --json."""
    ensure_writable_dir(out)
    dists: list[Distribution] = []
    summary: dict[str, Any] = {"out": str(out), "models": {}}
    for name in names:
        model, source = load_with_source(name)
        slug = model_slug(name)
        dist = measure_distribution(model, slug, source.quantized_from, include_embeddings, progress)
        del model
        gc.collect()
        path = write_distribution(dist, out, slug, force)
        dists.append(dist)
        summary["models"][slug] = {
            "dir": str(path),
            "quantized_from": dist.quantized_from,
            "matrices": len(dist.matrices),
            "weights": dist.overall["count"],
            "zero_fraction": dist.overall["zero_fraction"],
            "median_abs": dist.overall["abs_quantiles"]["0.5"],
            "fraction_abs_le_2^-10": dist.overall["fraction_abs_le_2pow_minus_k"]["10"],
        }
    if len(dists) > 1:
        from .figures import compare_cdf_figure

        compare_cdf_figure(dists, out / COMPARE_FIGURE)
        summary["compare"] = str(out / COMPARE_FIGURE)
    return summary
