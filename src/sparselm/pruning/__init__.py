"""Pruning: magnitude (global or per matrix), Wanda and SparseGPT, any pattern, uniform or OWL allocation."""

from .driver import SPARSITY_FILE, OwlAllocation, Progress, PruneReport, owl_allocation, prune, prune_to_dir
from .settings import METHODS, PruneSettings, settings_from

__all__ = [
    "METHODS", "SPARSITY_FILE", "OwlAllocation", "Progress", "PruneReport", "PruneSettings", "owl_allocation", "prune",
    "prune_to_dir", "settings_from",
]
