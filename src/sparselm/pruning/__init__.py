"""Pruning: magnitude (global or per matrix), Wanda and SparseGPT, any pattern, uniform or OWL allocation."""

from . import magnitude, wanda, sparsegpt  # noqa: F401, I001 (registers the methods, in the order users see them)
from .driver import prune
from .owl import OwlAllocation, owl_allocation
from ..progress import Progress
from .registry import Pruner, register, registered_methods
from .report import PruneReport
from .save import PrunedModel, prune_to_dir
from .settings import PruneSettings, settings_from

__all__ = [
    "OwlAllocation", "Progress", "PruneReport", "PrunedModel", "PruneSettings", "Pruner", "owl_allocation", "prune", "prune_to_dir",
    "register", "registered_methods", "settings_from",
]
