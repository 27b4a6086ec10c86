"""Global magnitude pruning at 0.5 on smollm2-135m: sparselm vs torch.nn.utils.prune.global_unstructured.

Each side runs in its own subprocess on the same loaded weights (every Linear in the 30 blocks, 106M weights),
timed after loading, with peak RSS sampled from /proc over the loaded model as baseline. transformers maps
safetensors weights from the file; "loaded" here means every page rewritten into private memory first (the state
after any earlier in-place step), and a third run times sparselm on the still file-mapped weights for comparison.
Targets: at least 30× faster than torch, and under 0.3 GB above the loaded model.
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


def run_side(side: str, threads: int, materialise: bool) -> dict:
    """Load the model, prune it with one implementation, and measure time and memory over the loaded model."""
    from torch.nn.utils import prune as torch_prune

    from sparselm.masks import Unstructured
    from sparselm.models import load
    from sparselm.pruning.magnitude import prune_global
    from sparselm.weights import select_matrices

    torch.set_num_threads(threads)
    model = load(MODEL)
    matrices = select_matrices(model)
    with torch.no_grad():
        for p in model.parameters():
            if materialise:  # rewrite every page: the file-mapped weights become private memory before timing
                p.view(torch.int32 if p.element_size() == 4 else torch.int16).bitwise_or_(0)
            else:  # only read every page: the first write to each one inside the timed step is a copy-on-write fault
                float(p.sum())
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
    parser.add_argument("--mapped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.threads, materialise=not args.mapped)))
        return
    def measure(side: str, *extra: str) -> dict:
        cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    ours, theirs, ours_mapped = measure("sparselm"), measure("torch"), measure("sparselm", "--mapped")
    print(f"global magnitude {SPARSITY} on {MODEL}: {ours['weights']:,} weights, {args.threads} torch thread(s)")
    for r in (ours, theirs):
        print(
            f"  {r['side']:<9} {r['seconds']:8.2f} s   peak over loaded model {r['over_model_bytes'] / 2**30:6.3f} GB"
            f"   achieved sparsity {r['sparsity']:.6f}"
        )
    print(f"speed-up: {theirs['seconds'] / ours['seconds']:.1f}x (target >= 30x); "
          f"sparselm memory over model {ours['over_model_bytes'] / 2**30:.3f} GB (target < 0.3 GB)")
    print(f"  sparselm on still file-mapped weights (first write to each page is a copy-on-write fault, which any "
          f"in-place pruner pays once): {ours_mapped['seconds']:.2f} s = {theirs['seconds'] / ours_mapped['seconds']:.1f}x")


if __name__ == "__main__":
    main()
