"""2:4 semi-structured sparsity on CUDA: `torch.sparse.to_sparse_semi_structured` against dense, side by side.

Part 1 times single matrices of smollm2-135m's shapes (fp16) at several token counts; part 2 times the whole model,
2:4 magnitude-pruned per layer, accelerated with policy "semi-structured", for prefill (last-position logits) and
checks its logits against the dense model. Needs a CUDA GPU (exits with a clear message otherwise).
Run: .venv/bin/python benchmarks/gpu_semi_structured.py [--json]
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparselm.runtime.timing import compare

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 128, 512, 2048]
ROUNDS = 20
MIN_SAMPLE_SECONDS = 0.001  # GPU calls of a few microseconds are repeated so launch jitter averages out


def side_by_side(dense: Callable[[], object], sparse: Callable[[], object]) -> dict:
    """Seconds per call of each (medians of alternating rounds) and the speed-up with its range over rounds."""
    result = compare(dense, sparse, ROUNDS, MIN_SAMPLE_SECONDS, synchronize=torch.cuda.synchronize)
    return {"dense": result.baseline.median, "sparse": result.candidate.median, **result.speedup.as_dict()}


def speedup_text(timed: dict) -> str:
    noise = ", within noise" if timed["within_noise"] else ""
    return f"{timed['speedup']:.2f}× [{timed['speedup_low']:.2f}–{timed['speedup_high']:.2f}{noise}]"


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
            timed = side_by_side(lambda: F.linear(x, w), lambda: F.linear(x, ws))
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            rows.append({"shape": [out_f, in_f], "tokens": t, "dense_us": timed["dense"] * 1e6,
                         "sparse_us": timed["sparse"] * 1e6, "speedup": timed["speedup"],
                         "speedup_range": [timed["speedup_low"], timed["speedup_high"]],
                         "within_noise": timed["within_noise"], "max_abs_err": err})
            print(f"{out_f}x{in_f} T={t:<5} dense {timed['dense'] * 1e6:8.1f} us  2:4 {timed['sparse'] * 1e6:8.1f} us  "
                  f"{speedup_text(timed)}  max|Δ| {err:.2e}", flush=True)
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
            timed = side_by_side(lambda: dense(**kw), lambda: sparse(**kw))
            err = (dense(**kw).logits - sparse(**kw).logits).abs().max().item()
        rows.append({"tokens": t, "dense_ms": timed["dense"] * 1e3, "semi_structured_ms": timed["sparse"] * 1e3,
                     "speedup": timed["speedup"], "speedup_range": [timed["speedup_low"], timed["speedup_high"]],
                     "within_noise": timed["within_noise"], "max_abs_logit_err": err, "replaced": report.replaced})
        print(f"smollm2-135m 2:4 prefill {t}: dense {timed['dense'] * 1e3:.2f} ms, semi-structured "
              f"{timed['sparse'] * 1e3:.2f} ms → {speedup_text(timed)} ({report['replaced']} layers), "
              f"max|Δlogit| {err:.3e}", flush=True)
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
