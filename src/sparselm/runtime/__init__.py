"""Sparse CPU runtime: measured per-layer dispatch between dense and sparse kernels, and side-by-side benchmarks."""

from .accelerate import POLICIES, accelerate
from .bench import bench
from .modules import SparseLinear

__all__ = ["POLICIES", "SparseLinear", "accelerate", "bench"]
