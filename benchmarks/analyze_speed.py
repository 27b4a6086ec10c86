"""How long the weight-distribution study of smollm2-135m takes after loading, and its memory over the model.

Targets: under 10 s on 2 cores; peak memory above the loaded model under 10% of the model's size.
Run: .venv/bin/python benchmarks/analyze_speed.py
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_during  # noqa: E402

from sparselm.analysis import measure_distribution, write_distribution  # noqa: E402
from sparselm.models import load_with_source  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, source = load_with_source("smollm2-135m")
    load_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # safetensors weights are memory-mapped: touch every page so the baseline holds the whole loaded model
    for p in model.parameters():
        float(p.detach().sum())
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:

        def analyse() -> float:
            t = time.perf_counter()
            dist = measure_distribution(model, "smollm2-135m", source.quantized_from)
            write_distribution(dist, Path(tmp), "smollm2-135m")
            return time.perf_counter() - t

        seconds, baseline, peak = peak_rss_during(analyse)
    over = peak - baseline
    print(f"model: smollm2-135m, {model_bytes / 2**20:.0f} MiB of parameters, loaded in {load_s:.1f} s")
    print(f"analysis (stats + tables + 3 figures): {seconds:.2f} s on {torch.get_num_threads()} threads  (target < 10 s)")
    print(
        f"peak RSS over the loaded model: {over / 2**20:.1f} MiB = {over / model_bytes:.1%} of the model "
        f"(target < 10%)"
    )


if __name__ == "__main__":
    main()
