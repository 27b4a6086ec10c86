"""2:4 semi-structured sparsity on CUDA: `torch.sparse.to_sparse_semi_structured` against dense, side by side.

Part 1 times single matrices of smollm2-135m's shapes (fp16) at several token counts; part 2 times the whole model,
2:4 magnitude-pruned per layer, accelerated with policy "semi-structured", for prefill (last-position logits) and
checks its logits against the dense model. Needs a CUDA GPU (exits with a clear message otherwise).
Run: .venv/bin/python benchmarks/gpu_semi_structured.py [--json]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 128, 512, 2048]
ROUNDS = 20


def cuda_median(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.reshape(-1, 4).clone()
    groups.scatter_(1, groups.abs().argsort(dim=1)[:, :2], 0.0)
    return groups.reshape(weight.shape)


def matrices() -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_f, in_f in SHAPES:
        w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
        ws = to_sparse_semi_structured(w)
        for t in TOKENS:
            x = torch.randn(t, in_f, device="cuda", dtype=torch.float16)
            dense, sparse = cuda_median(lambda: F.linear(x, w)), cuda_median(lambda: F.linear(x, ws))
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            rows.append({"shape": [out_f, in_f], "tokens": t, "dense_us": dense * 1e6, "sparse_us": sparse * 1e6,
                         "speedup": dense / sparse, "max_abs_err": err})
            print(f"{out_f}x{in_f} T={t:<5} dense {dense * 1e6:8.1f} us  2:4 {sparse * 1e6:8.1f} us  "
                  f"{dense / sparse:.2f}×  max|Δ| {err:.2e}", flush=True)
    return rows


def whole_model() -> list[dict]:
    from sparselm.models import load
    from sparselm.runtime import accelerate
    from sparselm.weights import select_matrices

    dense = load("smollm2-135m", dtype=torch.float16).cuda()
    for m in select_matrices(dense):
        m.set_weight(two_four(m.weight()))
    sparse = copy.deepcopy(dense)
    report = accelerate(sparse, policy="semi-structured")
    rows = []
    for t in (128, 512):
        ids = torch.randint(3, dense.config.vocab_size, (1, t), device="cuda")
        kw = {"input_ids": ids, "logits_to_keep": 1}
        with torch.inference_mode():
            d = cuda_median(lambda: dense(**kw))
            s = cuda_median(lambda: sparse(**kw))
            err = (dense(**kw).logits - sparse(**kw).logits).abs().max().item()
        rows.append({"tokens": t, "dense_ms": d * 1e3, "semi_structured_ms": s * 1e3, "speedup": d / s,
                     "max_abs_logit_err": err, "replaced": report["replaced"]})
        print(f"smollm2-135m 2:4 prefill {t}: dense {d * 1e3:.2f} ms, semi-structured {s * 1e3:.2f} ms → "
              f"{d / s:.2f}× ({report['replaced']} layers), max|Δlogit| {err:.3e}", flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: 2:4 semi-structured kernels run only on CUDA; run this script on a GPU machine")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    result = {"device": torch.cuda.get_device_name(), "matrices": matrices(), "model": whole_model()}
    if "--json" in sys.argv:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
