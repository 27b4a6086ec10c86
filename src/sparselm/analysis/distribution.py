"""The weight-distribution study of one model: stats.json, layers.csv and the histograms behind the figures."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..facts import family as model_family
from ..progress import SILENT, Progress
from ..weights import Matrix, select_matrices
from .stats import POW2_EXPONENTS, QUANTILES, Histogram, summarize


@dataclass
class Distribution:
    """Everything measured about one model's weights; figures and tables are drawn from it."""

    model: str
    family: str
    quantized_from: str | None
    include_embeddings: bool
    overall: dict[str, Any]
    overall_hist: Histogram
    matrices: list[dict[str, Any]]
    sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    block_abs_counts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @property
    def source_note(self) -> str | None:
        return f"dequantised from {self.quantized_from}" if self.quantized_from else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.family,
            "quantized_from": self.quantized_from,
            "note": self.source_note,
            "include_embeddings": self.include_embeddings,
            "matrices_analysed": len(self.matrices),
            "quantile_definition": "numpy 'linear' quantiles of |w|, exact (no sampling)",
            "overall": self.overall,
            "by_side": self.sides,
            "matrices": self.matrices,
        }


def measure_distribution(
    model: nn.Module,
    name: str,
    quantized_from: str | None = None,
    include_embeddings: bool = False,
    progress: Progress = SILENT,
) -> Distribution:
    """Stats per matrix, per side, per block and overall; one tensor in flight at a time."""
    matrices = select_matrices(model, include_embeddings)
    rows: list[dict[str, Any]] = []
    overall = Histogram()
    side_hists: dict[str, Histogram] = {}
    block_abs_counts: dict[tuple[str, int], torch.Tensor] = {}
    progress.start(f"analysing {name}", len(matrices))
    for m in matrices:
        stats, hist = summarize(lambda m=m: [m.weight()])
        rows.append({**_matrix_labels(m), **stats})
        overall.merge(hist)
        side_hists.setdefault(m.side, Histogram()).merge(hist)
        if m.block is not None and m.prunable:
            side = "encoder" if m.side == "encoder" else "decoder"
            key = (side, m.block)
            block_abs_counts[key] = block_abs_counts[key] + hist.abs_counts if key in block_abs_counts else hist.abs_counts
        progress.advance()
    overall_stats, _ = summarize(lambda: (m.weight() for m in matrices), overall)
    sides = {}
    if len(side_hists) == 1:
        sides[next(iter(side_hists))] = overall_stats
    for side, hist in side_hists.items() if len(side_hists) > 1 else ():
        chosen = [m for m in matrices if m.side == side]
        sides[side], _ = summarize(lambda chosen=chosen: (m.weight() for m in chosen), hist)
    return Distribution(
        model=name,
        family=model_family(model),
        quantized_from=quantized_from,
        include_embeddings=include_embeddings,
        overall=overall_stats,
        overall_hist=overall,
        matrices=rows,
        sides=sides,
        block_abs_counts=block_abs_counts,
    )


def _matrix_labels(m: Matrix) -> dict[str, Any]:
    rows, cols = m.shape
    return {
        "name": m.name,
        "block": m.block,
        "component": m.component,
        "side": m.side,
        "kind": m.kind,
        "prunable": m.prunable,
        "rows": rows,
        "cols": cols,
    }


CSV_COLUMNS = (
    ["name", "block", "component", "side", "kind", "prunable", "rows", "cols", "count", "zeros", "zero_fraction"]
    + ["mean", "std", "mean_abs", "max_abs"]
    + [f"abs_q{q:g}" for q in QUANTILES]
    + [f"frac_abs_le_2^-{k}" for k in POW2_EXPONENTS]
)


def layers_csv(dist: Distribution) -> str:
    """One row per matrix with the same numbers as stats.json."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in dist.matrices:
        flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
        flat.update({f"abs_q{q}": v for q, v in row["abs_quantiles"].items()})
        flat.update({f"frac_abs_le_2^-{k}": v for k, v in row["fraction_abs_le_2pow_minus_k"].items()})
        writer.writerow(["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])
    return buf.getvalue()
