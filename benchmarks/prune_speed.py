"""Global magnitude pruning at 0.5 on smollm2-135m: sparselm vs torch.nn.utils.prune.global_unstructured.

Each side runs in its own subprocess on the same loaded weights (every Linear in the 30 blocks, 106M weights),
timed after loading, with peak RSS sampled from /proc over the loaded model as baseline.
Targets (issue 3): at least 30× faster than torch, and under 0.3 GB above the loaded model.
Run: .venv/bin/python benchmarks/prune_speed.py [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_during  # noqa: E402

MODEL = "smollm2-135m"
SPARSITY = 0.5


def run_side(side: str, threads: int) -> dict:
    """Load the model, prune it with one implementation, and measure time and memory over the loaded model."""
    from torch.nn.utils import prune as torch_prune

    from sparselm.masks import Unstructured
    from sparselm.models import load
    from sparselm.pruning.magnitude import prune_global
    from sparselm.weights import select_matrices

    torch.set_num_threads(threads)
    model = load(MODEL)
    matrices = select_matrices(model)
    for p in model.parameters():  # memory-mapped weights: touch every page so the baseline holds the model
        float(p.detach().sum())
    gc.collect()

    def ours() -> None:
        prune_global([m.weight() for m in matrices], SPARSITY, Unstructured())

    def theirs() -> None:
        params = [(m.module, "weight") for m in matrices]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)

    def timed() -> float:
        t = time.perf_counter()
        (ours if side == "sparselm" else theirs)()
        return time.perf_counter() - t

    seconds, baseline, peak = peak_rss_during(timed)
    zeros = sum(int((m.module.weight == 0).sum()) for m in matrices)
    total = sum(m.numel for m in matrices)
    return {"side": side, "seconds": seconds, "over_model_bytes": peak - baseline, "sparsity": zeros / total,
            "weights": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on both sides")
    parser.add_argument("--side", choices=["sparselm", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.threads)))
        return
    results = {}
    for side in ("sparselm", "torch"):
        cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ours, theirs = results["sparselm"], results["torch"]
    print(f"global magnitude {SPARSITY} on {MODEL}: {ours['weights']:,} weights, {args.threads} torch thread(s)")
    for r in (ours, theirs):
        print(
            f"  {r['side']:<9} {r['seconds']:8.2f} s   peak over loaded model {r['over_model_bytes'] / 2**30:6.3f} GB"
            f"   achieved sparsity {r['sparsity']:.6f}"
        )
    print(f"speed-up: {theirs['seconds'] / ours['seconds']:.1f}x (target >= 30x); "
          f"sparselm memory over model {ours['over_model_bytes'] / 2**30:.3f} GB (target < 0.3 GB)")


if __name__ == "__main__":
    main()
