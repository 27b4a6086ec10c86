"""Global magnitude pruning at 0.5 on smollm2-135m through the public API, against torch and the memory bound.

Compared, on every Linear of the 30 blocks (106M weights, 425 MB in fp32):
- sparselm: `sparselm.prune(model, method="magnitude", sparsity=0.5, scope="global")` — the public path, with its
  matrix selection and report, as `sparselm prune` runs it after loading;
- torch: `torch.nn.utils.prune.global_unstructured(..., L1Unstructured)` followed by `prune.remove` on each module;
- the memory bound: one read and one write of every weight, at the bandwidth of a plain `copy_` of as many bytes
  measured on this machine (the time of that copy).
Time: both sides in one process on the same weights, restored from a pristine copy before every sample (untimed),
in alternating rounds (`sparselm.runtime.timing`): median seconds with their range, and the per-round speed-up.
Memory: peak RSS over the loaded model, each side in its own subprocess; "loaded" means every page of the weights
written into private memory first, the state after any earlier in-place step. A third subprocess runs sparselm on
weights only read, still file-mapped, where the first write to each page is a copy-on-write fault (any in-place
pruner pays it once; its time and memory are shown beside).
Targets: speed-up ≥ 30× (met only when the whole range of per-round speed-ups is at or above it), peak ≤ +0.3 GB, and
the achieved sparsity exact (floor(0.5·n) zeros).
Timings on a shared or loaded machine are noisy: read the ranges.
Run: .venv/bin/python benchmarks/prune_speed.py [--threads N] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_during  # noqa: E402

from sparselm.masks import prune_count  # noqa: E402
from sparselm.runtime.timing import Timing, alternating, speedup  # noqa: E402

MODEL = "smollm2-135m"
SPARSITY = 0.5
SPEEDUP_TARGET = 30.0
MEMORY_TARGET_GB = 0.3
SIDES = ("sparselm", "torch")


def loaded_model(materialise: bool) -> torch.nn.Module:
    """The model with every weight page resident: rewritten into private memory, or only read (file-mapped)."""
    from sparselm.models import load

    model = load(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            if materialise:
                p.view(torch.int32 if p.element_size() == 4 else torch.int16).bitwise_or_(0)
            else:
                float(p.sum())
    gc.collect()
    return model


def pruner(side: str, model: torch.nn.Module) -> Callable[[], None]:
    """One side's whole pruning step on `model`, in place."""
    import sparselm
    from torch.nn.utils import prune as torch_prune

    from sparselm.weights import select_matrices

    modules = [m.module for m in select_matrices(model)]

    def ours() -> None:
        sparselm.prune(model, method="magnitude", sparsity=SPARSITY, scope="global")

    def theirs() -> None:
        torch_prune.global_unstructured(
            [(m, "weight") for m in modules], pruning_method=torch_prune.L1Unstructured, amount=SPARSITY
        )
        for m in modules:
            torch_prune.remove(m, "weight")

    return ours if side == "sparselm" else theirs


def pruned_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(zeros, weights) over the matrices sparselm prunes."""
    from sparselm.masks import count_zeros
    from sparselm.weights import select_matrices

    mats = select_matrices(model)
    return sum(count_zeros(m.parameter) for m in mats), sum(m.numel for m in mats)


def memory_side(side: str, threads: int, materialise: bool) -> dict:
    """Subprocess body: seconds and peak RSS over the loaded model of one side's single run."""
    torch.set_num_threads(threads)
    model = loaded_model(materialise)
    step = pruner(side, model)

    def timed() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    seconds, baseline, peak = peak_rss_during(timed)
    zeros, total = pruned_weights(model)
    return {"side": side, "seconds": seconds, "over_model_bytes": peak - baseline, "zeros": zeros, "weights": total}


def measure_memory(side: str, threads: int, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-side", side, "--threads", str(threads), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed_rounds(threads: int, rounds: int) -> tuple[dict[str, Timing], Timing, int, tuple[int, int]]:
    """Alternating timings of both sides on the same weights; the plain-copy time of the weights' bytes; their
    bytes; (zeros, weights) after sparselm's last run."""
    from sparselm.weights import select_matrices

    torch.set_num_threads(threads)
    model = loaded_model(materialise=True)
    modules = [m.module for m in select_matrices(model)]
    pristine = [m.weight.detach().clone() for m in modules]
    steps = {side: pruner(side, model) for side in SIDES}
    counts: dict[str, tuple[int, int]] = {}

    def sample(side: str) -> Callable[[], float]:
        def run() -> float:
            with torch.no_grad():
                for m, w in zip(modules, pristine):
                    m.weight.copy_(w)  # torch's `remove` leaves a new Parameter: copy into whichever is there
            gc.collect()
            start = time.perf_counter()
            steps[side]()
            seconds = time.perf_counter() - start
            if side == "sparselm":
                counts[side] = pruned_weights(model)
            return seconds

        return run

    sample("sparselm")()  # warm-up of the cheap side only: one torch run takes seconds, far above first-call costs
    timings = alternating({side: sample(side) for side in SIDES}, rounds, warmup=False)
    nbytes = sum(w.numel() * w.element_size() for w in pristine)
    source = torch.cat([w.reshape(-1) for w in pristine])
    target = torch.empty_like(source)
    copies = alternating({"copy": lambda: _seconds(lambda: target.copy_(source))}, rounds)["copy"]
    return timings, copies, nbytes, counts["sparselm"]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on every side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (torch takes ~20 s each)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--memory-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--mapped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_side:
        print(json.dumps(memory_side(args.memory_side, args.threads, materialise=not args.mapped)))
        return

    timings, copy, nbytes, (zeros, total) = timed_rounds(args.threads, args.rounds)
    ratio = speedup(timings["torch"], timings["sparselm"])
    memory = {side: measure_memory(side, args.threads) for side in SIDES}
    mapped = measure_memory("sparselm", args.threads, "--mapped")
    exact = zeros == prune_count(total, SPARSITY) and memory["sparselm"]["zeros"] == zeros
    ours_gb = memory["sparselm"]["over_model_bytes"] / 2**30
    result = {
        "model": MODEL, "sparsity": SPARSITY, "threads": args.threads, "rounds": args.rounds, "weights": total,
        "weight_bytes": nbytes,
        "seconds": {side: list(t.values) for side, t in timings.items()},
        "memory_bound_seconds": list(copy.values),
        "speedup": ratio.median, "speedup_low": ratio.low, "speedup_high": ratio.high,
        "peak_over_model_gb": {side: memory[side]["over_model_bytes"] / 2**30 for side in SIDES},
        "mapped_sparselm": {"seconds": mapped["seconds"], "peak_over_model_gb": mapped["over_model_bytes"] / 2**30},
        "achieved_zeros": zeros, "exact_sparsity": exact,
        "speedup_target_met": ratio.low >= SPEEDUP_TARGET if ratio.rounds >= 3 else None,
        "memory_target_met": ours_gb <= MEMORY_TARGET_GB,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"global magnitude {SPARSITY} on {MODEL}: {total:,} weights ({nbytes / 2**20:.0f} MiB), "
          f"{args.threads} torch thread(s), {args.rounds} alternating rounds (median [min–max])")
    bound = copy
    for name, t in (("sparselm", timings["sparselm"]), ("torch", timings["torch"]), ("memory bound", bound)):
        mem = f"   peak over loaded model {memory[name]['over_model_bytes'] / 2**30:6.3f} GB" if name in memory else ""
        print(f"  {name:<13} {t.median:8.3f} s [{t.low:.3f}–{t.high:.3f}]{mem}")
    print(f"  (memory bound: one read + one write of {nbytes / 2**20:.0f} MiB at the bandwidth of a plain copy, "
          f"{2 * nbytes / bound.median / 2**30:.1f} GiB/s; "
          f"sparselm at {timings['sparselm'].median / bound.median:.1f}x the bound)")
    print(f"  sparselm on still file-mapped weights: {mapped['seconds']:.3f} s, "
          f"peak over loaded model {mapped['over_model_bytes'] / 2**30:.3f} GB (one copy-on-write fault per page)")
    met = ratio.low >= SPEEDUP_TARGET if ratio.rounds >= 3 else None
    print(f"speed-up over torch: {ratio.median:.1f}x [{ratio.low:.1f}–{ratio.high:.1f}]  "
          f"target >= {SPEEDUP_TARGET:.0f}x: {verdict(met)}")
    print(f"sparselm peak memory: +{ours_gb:.3f} GB  target <= +{MEMORY_TARGET_GB} GB: "
          f"{verdict(ours_gb <= MEMORY_TARGET_GB)}")
    print(f"exact sparsity ({zeros:,} of {total:,} zeros = floor({SPARSITY}·n)): {verdict(exact)}")


if __name__ == "__main__":
    main()
