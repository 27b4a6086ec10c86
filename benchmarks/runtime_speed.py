"""Forward speed of smollm2-135m, dense against `accelerate(policy="auto")`, measured side by side.

Targets (2 threads): prefill of 128 tokens as generation runs it (logits for the last position only) is
≥ 2.0× faster than dense at 0.9 global magnitude sparsity and ≥ 3.0× at 0.95; at every sparsity from 0 to 0.99 the
accelerated model is never below 0.95× of dense, for prefill nor for one-token decode steps (KV cache).
Each row loads the pruned model, lets `accelerate` measure its layers, then alternates dense and accelerated runs
(runtime.timing: the median of the per-round speed-ups, printed with their range over --rounds and marked "within
noise" when that range reaches 1.0×; a target counts as met only by a result that is not within noise).
Run: .venv/bin/python benchmarks/runtime_speed.py [--threads 2] [--rounds 7] [--sparsities 0,0.9] [--no-block] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _pruned import pruned_dir  # noqa: E402

from sparselm.runtime import bench  # noqa: E402

MODEL = "smollm2-135m"
SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
PATTERNS = [(0.9, "block:16x16")]
TARGETS = {0.9: 2.0, 0.95: 3.0}
FLOOR = 0.95


def row(sparsity: float, pattern: str, threads: int, rounds: int) -> dict:
    path = MODEL if sparsity == 0.0 else str(pruned_dir(MODEL, sparsity, pattern))
    result = bench(path, tokens=[128], threads=threads, rounds=rounds, steps=16, measure_size=False)
    prefill, decode = result.prefill[0], result.decode
    target = TARGETS.get(sparsity) if pattern == "unstructured" else None
    above_floor = all(r.speedup >= FLOOR or r.within_noise for r in (prefill, decode))
    ok = above_floor and (target is None or (prefill.speedup >= target and not prefill.within_noise))
    return {
        "sparsity": sparsity,
        "pattern": pattern,
        "prefill128_dense_ms": prefill.dense_ms,
        "prefill128_accelerated_ms": prefill.accelerated_ms,
        "prefill128_speedup": prefill.speedup,
        "prefill128_speedup_range": [prefill.speedup_low, prefill.speedup_high],
        "prefill128_within_noise": prefill.within_noise,
        "decode_dense_ms": decode.dense_ms,
        "decode_accelerated_ms": decode.accelerated_ms,
        "decode_speedup": decode.speedup,
        "decode_speedup_range": [decode.speedup_low, decode.speedup_high],
        "decode_within_noise": decode.within_noise,
        "sparse_layers": result.report.choices,
        "fused_groups": len(result.report.fused_groups),
        "target": target,
        "ok": ok,
    }


def with_spread(r: dict, step: str) -> str:
    low, high = r[f"{step}_speedup_range"]
    noise = ", within noise" if r[f"{step}_within_noise"] else ""
    return f"{r[f'{step}_speedup']:.2f}× [{low:.2f}–{high:.2f}{noise}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated subset")
    parser.add_argument("--no-block", action="store_true", help="skip the block:16x16 row")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    settings = [(float(s), "unstructured") for s in args.sparsities.split(",")] + ([] if args.no_block else PATTERNS)
    for sparsity, pattern in settings:
        r = row(sparsity, pattern, args.threads, args.rounds)
        rows.append(r)
        goal = "" if r["target"] is None else f" (target ≥{r['target']:.1f}×)"
        print(
            f"s={sparsity:<5} {pattern:>12}  prefill 128: dense {r['prefill128_dense_ms']:8.1f} ms, accelerated "
            f"{r['prefill128_accelerated_ms']:8.1f} ms → {with_spread(r, 'prefill128')}{goal}  "
            f"decode: {r['decode_dense_ms']:6.1f} → {r['decode_accelerated_ms']:6.1f} ms/token "
            f"({with_spread(r, 'decode')})  sparse layers {r['sparse_layers']}, {r['fused_groups']} fused groups  "
            f"{'ok' if r['ok'] else 'MISSED'}",
            flush=True,
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"threads {args.threads}; all targets met: {all(r['ok'] for r in rows)}")


if __name__ == "__main__":
    main()
