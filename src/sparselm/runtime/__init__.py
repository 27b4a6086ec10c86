"""Sparse CPU runtime: measured per-layer dispatch between dense and sparse kernels, and side-by-side benchmarks."""

from .accelerate import POLICIES, accelerate
from .bench import bench
from .generate import generate
from .modules import SparseLinear
from .timing import Comparison, Speedup, Timing, compare

__all__ = ["POLICIES", "Comparison", "SparseLinear", "Speedup", "Timing", "accelerate", "bench", "compare", "generate"]
