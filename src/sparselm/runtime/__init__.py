"""Sparse CPU runtime: measured per-layer dispatch between dense and sparse kernels, and side-by-side benchmarks."""

from .accelerate import POLICIES, AccelerateReport, FusedGroup, LayerChoice, accelerate
from .bench import BenchResult, DecodeRow, SizeInfo, SpeedRow, bench
from .generate import Generation, generate
from .modules import SparseLinear
from .timing import Comparison, Speedup, Timing, compare

__all__ = [
    "POLICIES", "AccelerateReport", "BenchResult", "Comparison", "DecodeRow", "FusedGroup", "Generation", "LayerChoice",
    "SizeInfo", "SpeedRow", "SparseLinear", "Speedup", "Timing", "accelerate", "bench", "compare", "generate",
]
