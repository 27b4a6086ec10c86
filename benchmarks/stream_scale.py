"""Pruning models bigger than memory: in-memory vs streamed (`prune --max-memory`), each run in its own process.

(a) smollm2-135m, Wanda 50%: in memory, then streamed under --max-memory 200MB. Reports bit-identity of the
    weights, the wall-time ratio and each run's peak RSS (from the OS: the child's ru_maxrss) minus the peak RSS of
    a process that only imported torch, transformers and the model's class (its module pulls in torch._dynamo,
    sympy and scipy, ~130 MB, which both runs pay: neither can build the model without it); the delta over torch
    and transformers alone is shown too. Targets: streamed RSS delta <= 300 MB, wall <= 1.3x.
(b) a random Llama of >= 1B parameters (hidden 2048, 22 layers, intermediate 5632, smollm2's tokenizer and its
    vocabulary of 49152: 1.17B parameters; built once as bf16 shards under the sparselm cache, no download), Wanda
    50% streamed under --max-memory 1GB: peak RSS <= 1.5 GB and the time per block. Slow on a small CPU; run with
    --large (or --large-only).

Timings on a shared machine are noisy: each run is repeated --repeats times, the two runs of (a) alternating, and
shown as median (min-max).

    python benchmarks/stream_scale.py [--samples 32 --seqlen 512] [--repeats 1] [--large | --large-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS_ONLY = "import torch, transformers"
BASELINE = IMPORTS_ONLY + "; transformers.LlamaForCausalLM"  # the modeling code both runs import
RSS_TARGET_MB, WALL_TARGET, LARGE_RSS_TARGET_MB = 300, 1.3, 1500


def _wrapped_peak(code: str) -> float:
    wrapper = (
        "import resource, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, code], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def measured(code: str, repeats: int) -> tuple[list[float], float]:
    """Wall times of each repeat and the largest peak RSS (MB), each repeat in a fresh wrapper process."""
    return measured_side_by_side({"run": code}, repeats)["run"]


def measured_side_by_side(codes: dict[str, str], repeats: int) -> dict[str, tuple[list[float], float]]:
    """`measured` for several runs in alternating order (A B, B A, ...), so that a drift of the machine's speed
    weighs on each alike."""
    walls: dict[str, list[float]] = {name: [] for name in codes}
    peaks: dict[str, list[float]] = {name: [] for name in codes}
    for round_ in range(repeats):
        for name in (list(codes) if round_ % 2 == 0 else list(reversed(codes))):
            started = time.perf_counter()
            peaks[name].append(_wrapped_peak(codes[name]))
            walls[name].append(time.perf_counter() - started)
    return {name: (walls[name], max(peaks[name])) for name in codes}


def prune_code(model: str, out: Path, samples: int, seqlen: int, max_memory: str | None) -> str:
    limit = f", max_memory=parse_size({max_memory!r})" if max_memory else ""
    return (
        "from pathlib import Path; from sparselm.facts import parse_size; "
        "from sparselm.pruning import prune_to_dir, settings_from; "
        f"s = settings_from(method='wanda', sparsity=0.5, calib_samples={samples}, calib_seqlen={seqlen}); "
        f"prune_to_dir({model!r}, s, Path({str(out)!r}), force=True{limit})"
    )


def identical(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file
    import torch

    def tensors(d: Path) -> dict:
        found: dict = {}
        for f in sorted(d.glob("*.safetensors")):
            found.update(load_file(f))
        return found

    x, y = tensors(a), tensors(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def verdict(name: str, ok: bool | None, detail: str) -> str:
    state = "not measured" if ok is None else "PASS" if ok else "FAIL"
    return f"{name}: {state} ({detail})"


def small(args: argparse.Namespace, work: Path) -> list[str]:
    _, imports = measured(IMPORTS_ONLY, 1)
    _, base = measured(BASELINE, 1)
    runs = measured_side_by_side({
        "mem": prune_code("smollm2-135m", work / "mem", args.samples, args.seqlen, None),
        "str": prune_code("smollm2-135m", work / "str", args.samples, args.seqlen, "200MB"),
    }, args.repeats)
    (mem_walls, mem_rss), (str_walls, str_rss) = runs["mem"], runs["str"]
    ratio = statistics.median(str_walls) / statistics.median(mem_walls)
    same = identical(work / "mem", work / "str")
    print(f"baseline (import torch+transformers+LlamaForCausalLM) peak RSS {base:.0f} MB; torch+transformers only "
          f"{imports:.0f} MB")
    print(f"{'run':<22}{'wall':>24}{'peak RSS':>12}{'minus baseline':>16}")
    print(f"{'in memory':<22}{spread(mem_walls):>24}{mem_rss:>10.0f}MB{mem_rss - base:>14.0f}MB")
    print(f"{'streamed 200MB':<22}{spread(str_walls):>24}{str_rss:>10.0f}MB{str_rss - base:>14.0f}MB")
    print(f"wall ratio streamed/in-memory {ratio:.2f}x (medians of {args.repeats})")
    return [
        verdict("(a) weights bit-identical", same, f"{same}"),
        verdict("(a) streamed RSS - torch+transformers import <= 300 MB (the issue's baseline)",
                str_rss - imports <= RSS_TARGET_MB, f"{str_rss - imports:.0f} MB"),
        verdict("(a) streamed RSS - import incl. the model class (both runs pay it) <= 300 MB",
                str_rss - base <= RSS_TARGET_MB, f"{str_rss - base:.0f} MB"),
        verdict("(a) wall <= 1.3x", ratio <= WALL_TARGET, f"{ratio:.2f}x; noisy on a shared CPU"),
    ]


def large_model() -> Path:
    """The random >= 1B Llama, built once as bf16 shards under the sparselm cache (keyed by the code that builds it)."""
    import hashlib

    from sparselm.sources import cache_dir

    code = (
        "import sys, torch, transformers; torch.manual_seed(0); path = sys.argv[1]; "
        "c = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, "
        "num_attention_heads=32, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048); "
        "m = transformers.LlamaForCausalLM(c).to(torch.bfloat16); "
        "m.save_pretrained(path, max_shard_size='500MB'); "
        "from transformers import AutoTokenizer; from sparselm.sources import resolve; "
        "AutoTokenizer.from_pretrained(resolve('smollm2-135m').path).save_pretrained(path)"
    )
    path = cache_dir() / f"bench-llama-1b-random-{hashlib.sha256(code.encode()).hexdigest()[:12]}"
    if not (path / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def large(args: argparse.Namespace, work: Path) -> list[str]:
    path = large_model()
    _, base = measured(BASELINE, 1)
    walls, rss = measured(prune_code(str(path), work / "large", args.samples, args.seqlen, "1GB"), 1)
    blocks = 22
    print(f"1B random Llama streamed under 1GB: {walls[0]:.0f} s, {walls[0] / blocks:.1f} s per block "
          f"(incl. loading and calibration), peak RSS {rss:.0f} MB (baseline {base:.0f} MB)")
    return [verdict("(b) peak RSS <= 1.5 GB", rss <= LARGE_RSS_TARGET_MB, f"{rss:.0f} MB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--large", action="store_true", help="also run (b), the >= 1B model (slow)")
    parser.add_argument("--large-only", action="store_true", help="run (b) alone; (a) is then not measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-scale-") as tmp:
        if args.large_only:
            lines = [verdict("(a)", None, "not run (--large-only)")]
        else:
            lines = small(args, Path(tmp))
        if args.large or args.large_only:
            lines += large(args, Path(tmp))
        else:
            lines += [verdict("(b) peak RSS <= 1.5 GB", None, "run with --large"),
                      verdict("(b) time per block", None, "run with --large")]
    print("\n".join(lines))
    print(json.dumps({"note": "timings from a shared machine are noisy"}))


if __name__ == "__main__":
    main()
