"""Packed size of the prunable matrices against the information bound and against compressed-tensors.

Target: for every sparsity s from 0.5 to 0.99 the packed bytes of all prunable matrices are within 1.10×
of Σ (H(s_m) + (1 − s_m)·b) · n_m / 8 over the matrices m (H the binary entropy, b the value bits: 32 for fp32,
16 for fp16), and never larger than dense. Models: smollm2-135m and minilm-l6, magnitude pruned globally at 0.5,
0.9, 0.95, 0.99 and per layer at 2:4; values kept in their dtype (fp32) and also stored as fp16.
Run: .venv/bin/python benchmarks/pack_size.py [--json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _pruned import pruned_dir  # noqa: E402

from sparselm.models import load  # noqa: E402
from sparselm.storage import get_codec  # noqa: E402
from sparselm.storage.pack import FORMATS, choose_encoding  # noqa: E402
from sparselm.weights import select_matrices  # noqa: E402

SETTINGS = [(0.5, "unstructured"), (0.9, "unstructured"), (0.95, "unstructured"), (0.99, "unstructured"), (None, "2:4")]
MODELS = ["smollm2-135m", "minilm-l6"]


def entropy(s: float) -> float:
    return 0.0 if s <= 0.0 or s >= 1.0 else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))


def sizes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
    """Bytes of the prunable matrices: dense, information bound, sparselm auto, compressed-tensors bitmask."""
    out = {"dense": 0.0, "bound": 0.0, "auto": 0.0, "compressed_tensors": 0.0, "zeros": 0, "weights": 0}
    ct = get_codec("sparse-bitmask")
    for m in select_matrices(model):
        w = m.weight().contiguous().to(dtype)
        n, bits = w.numel(), 8 * w.element_size()
        s = float((w == 0).sum()) / n
        out["zeros"] += int((w == 0).sum())
        out["weights"] += n
        out["dense"] += n * bits / 8
        out["bound"] += (entropy(s) + (1 - s) * bits) * n / 8
        out["auto"] += choose_encoding(w, FORMATS["auto"], use_zstd=True).nbytes
        out["compressed_tensors"] += ct.encode(w).nbytes
    return out


def main() -> None:
    rows = []
    for name in MODELS:
        for sparsity, pattern in SETTINGS:
            model = load(str(pruned_dir(name, sparsity, pattern)))
            for dtype in (torch.float32, torch.float16):
                r = sizes(model, dtype)
                rows.append(
                    {
                        "model": name,
                        "setting": pattern if sparsity is None else f"global {sparsity}",
                        "values": str(dtype).removeprefix("torch."),
                        "sparsity": r["zeros"] / r["weights"],
                        "dense_MB": r["dense"] / 1e6,
                        "bound_MB": r["bound"] / 1e6,
                        "sparselm_MB": r["auto"] / 1e6,
                        "compressed_tensors_MB": r["compressed_tensors"] / 1e6,
                        "sparselm_over_bound": r["auto"] / r["bound"],
                        "ct_over_bound": r["compressed_tensors"] / r["bound"],
                        "sparselm_over_dense": r["auto"] / r["dense"],
                        "target_met": r["auto"] <= 1.10 * r["bound"] and r["auto"] <= r["dense"],
                    }
                )
                print_row(rows[-1])
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))
    print(f"all targets met: {all(r['target_met'] for r in rows)}")


def print_row(r: dict) -> None:
    print(
        f"{r['model']:>13} {r['setting']:>12} {r['values']:>8} s={r['sparsity']:.3f}  dense {r['dense_MB']:8.2f} MB  "
        f"bound {r['bound_MB']:7.2f}  sparselm {r['sparselm_MB']:7.2f} ({r['sparselm_over_bound']:.3f}× bound)  "
        f"compressed-tensors {r['compressed_tensors_MB']:7.2f} ({r['ct_over_bound']:.3f}× bound)  "
        f"{'ok' if r['target_met'] else 'MISSED'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
