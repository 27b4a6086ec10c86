"""Pruned copies of the embedded models for the storage and runtime benchmarks, made once with sparselm.pruning
(global magnitude unless a pattern is given) and kept under $SPARSELM_CACHE/bench so both benchmarks share them."""

from __future__ import annotations

from pathlib import Path

from sparselm.sources import cache_dir
from sparselm.pruning import PruneSettings, prune_to_dir


def setting_name(sparsity: float | None, pattern: str) -> str:
    return pattern.replace(":", "_") if sparsity is None else f"{pattern.replace(':', '_')}-{sparsity:g}"


def pruned_dir(model: str, sparsity: float | None, pattern: str = "unstructured") -> Path:
    """A directory holding `model` pruned by magnitude: global ranking for unstructured, per layer for patterns."""
    out = cache_dir() / "bench" / f"{model}-{setting_name(sparsity, pattern)}"
    if not (out / "config.json").exists():
        scope = "global" if pattern == "unstructured" else "layer"
        settings = PruneSettings(method="magnitude", sparsity=sparsity, scope=scope, pattern=pattern)
        prune_to_dir(model, settings, out)
    return out
