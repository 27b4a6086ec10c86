"""Pruned copies of the embedded models for the storage and runtime benchmarks, made once with sparselm.pruning
(global magnitude unless a pattern is given) and kept under $SPARSELM_CACHE/bench so both benchmarks share them.
Each copy's name carries a hash of the code that made it (`pruning_code`): a copy made by other code is made again."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from _code import PACKAGE, with_sources
from sparselm.sources import cache_dir
from sparselm.pruning import PruneSettings, prune_to_dir

NOT_PRUNING = ("runtime", "cli", "study")  # subpackages that cannot change a pruned model's files


@functools.cache
def pruning_code() -> str:
    """A short hash of every sparselm source file that can change what a pruned model directory holds."""
    files = (p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in NOT_PRUNING)
    return with_sources(hashlib.sha256(), files).hexdigest()[:12]


def setting_name(sparsity: float | None, pattern: str) -> str:
    return pattern.replace(":", "_") if sparsity is None else f"{pattern.replace(':', '_')}-{sparsity:g}"


def pruned_dir(model: str, sparsity: float | None, pattern: str = "unstructured") -> Path:
    """A directory holding `model` pruned by magnitude: global ranking for unstructured, per layer for patterns."""
    out = cache_dir() / "bench" / f"{model}-{setting_name(sparsity, pattern)}-{pruning_code()}"
    if not (out / "config.json").exists():
        scope = "global" if pattern == "unstructured" else "layer"
        settings = PruneSettings(method="magnitude", sparsity=sparsity, scope=scope, pattern=pattern)
        prune_to_dir(model, settings, out)
    return out
