"""Calibrated pruning (Wanda, SparseGPT, 50% unstructured) on smollm2-135m: sparselm's driver against the reference
implementations' per-layer loops, in one process, on the same calibration windows.

The references are plain transcriptions of their published per-layer loops, written here (nothing is imported from
them): the inputs of the first decoder layer are caught one window at a time (their `Catcher`); then per layer,
forward hooks on every Linear feed each window's inputs to the layer's statistic — Wanda's `WrappedGPT.scaler_row`
(running mean of squared column norms, float32), SparseGPT's `SparseGPT.add_batch` (running mean of 2·xxᵀ, float32)
— the layer is pruned (Wanda: |W|·sqrt(scaler_row), stable sort per row; SparseGPT: `fasterprune`, float32 Cholesky,
blocks of 128, 1% dampening) and run again on every window to feed the next layer.
sparselm: `sparselm.pruning.prune(model, method=…, sparsity=0.5, windows=…)`, the public path `sparselm prune` runs.
Windows: `--samples` × `--seqlen` tokens of PTB train (seed 0), the same tensor for both sides.
Each run starts from a freshly loaded model (untimed); the sides alternate (A B, B A, …) for `--rounds` rounds.
Reported: median seconds with their range, the per-round ratio sparselm / reference (target ≤ 1.0: met only when
every round is at or below it), peak RSS above the loaded model during the run (target: sparselm ≤ the reference),
and how many keep-mask entries the two sides agree on (SparseGPT: sparselm prunes exactly ⌊s·n⌋ per block where the
reference's `<=` threshold prunes one more, so agreement is high but not 100%).
Timings on a shared or loaded machine are noisy: read the ranges.
Run: .venv/bin/python benchmarks/calibrated_speed.py [--methods wanda sparsegpt] [--samples 8] [--seqlen 1024]
     [--rounds 2] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_during  # noqa: E402

from sparselm.models import load, load_tokenizer  # noqa: E402
from sparselm.pruning import prune  # noqa: E402
from sparselm.windows import sample_windows, token_stream  # noqa: E402

MODEL = "smollm2-135m"
SPARSITY = 0.5
METHODS = ("wanda", "sparsegpt")


class _Caught(Exception):
    pass


def reference_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The reference `Catcher`: run the model on one window at a time and keep what the first layer is called with."""
    layer = model.model.layers[0]
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def catch(_module: nn.Module, args: tuple, kw: dict) -> None:
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Caught

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in windows:
            try:
                model(input_ids=row[None], use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The reference `find_layers`: every Linear of a decoder layer, by name."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class WrappedGPT:
    """Wanda's statistic: the running mean over windows of each input column's squared norm, in float32."""

    def __init__(self, layer: nn.Linear) -> None:
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class SparseGPT:
    """SparseGPT's per-layer object: running mean of 2·xxᵀ over windows, then `fasterprune`."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity: float, blocksize: int = 128, percdamp: float = 0.01) -> None:
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Losses = torch.zeros(self.rows)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


def wanda_prune_layer(subset: dict[str, nn.Linear], wrapped: dict[str, WrappedGPT], sparsity: float) -> None:
    for name, module in subset.items():
        W_metric = torch.abs(module.weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
        W_mask = torch.zeros_like(W_metric) == 1
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
        module.weight.data[W_mask] = 0


def reference_prune(model: nn.Module, windows: torch.Tensor, method: str, sparsity: float) -> None:
    """The reference per-layer loop (prune_wanda / llama_sequential), one window per layer call."""
    with torch.no_grad():
        inps, kwargs = reference_inputs(model, windows)
        outs: list[torch.Tensor] = [torch.empty(0)] * len(inps)
        for layer in model.model.layers:
            subset = linears(layer)
            stats = {name: (WrappedGPT if method == "wanda" else SparseGPT)(m) for name, m in subset.items()}

            def add_batch(name: str) -> Callable[..., None]:
                return lambda _m, inp, _out: stats[name].add_batch(inp[0].data)

            handles = [subset[name].register_forward_hook(add_batch(name)) for name in stats]
            for j in range(len(inps)):
                outs[j] = _output(layer(inps[j], **kwargs[j]))
            for h in handles:
                h.remove()
            if method == "wanda":
                wanda_prune_layer(subset, stats, sparsity)
            else:
                for gpt in stats.values():
                    gpt.fasterprune(sparsity)
            for j in range(len(inps)):
                outs[j] = _output(layer(inps[j], **kwargs[j]))
            inps, outs = outs, inps


def _output(value: Any) -> torch.Tensor:
    """A layer's hidden states: the reference indexes `[0]` of the tuple older transformers layers return."""
    return value[0] if isinstance(value, (tuple, list)) else value


def run_side(side: str, method: str, windows: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Seconds, peak RSS over the freshly loaded model, and the keep-mask of all block matrices of one run."""
    model = load(MODEL)
    gc.collect()

    def step() -> float:
        start = time.perf_counter()
        if side == "reference":
            reference_prune(model, windows, method, SPARSITY)
        else:
            prune(model, windows=windows, method=method, sparsity=SPARSITY)
        return time.perf_counter() - start

    seconds, baseline, peak = peak_rss_during(step)
    keep = torch.cat([m.weight.detach().reshape(-1) != 0 for layer in model.model.layers
                      for m in linears(layer).values()])
    return seconds, peak - baseline, keep


def compare(method: str, windows: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Alternating runs of both sides (order reversed every round)."""
    sides = ("reference", "sparselm")
    seconds: dict[str, list[float]] = {s: [] for s in sides}
    memory: dict[str, list[int]] = {s: [] for s in sides}
    keeps: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            s, mem, keep = run_side(side, method, windows)
            seconds[side].append(s)
            memory[side].append(mem)
            keeps.setdefault(side, keep)
            progress = f"  {method} round {r + 1}: {side} {s:.2f} s, peak +{mem / 2**30:.3f} GB"
            print(progress, file=sys.stderr, flush=True)
    ratios = [o / t for o, t in zip(seconds["sparselm"], seconds["reference"])]
    agree = float((keeps["reference"] == keeps["sparselm"]).float().mean())
    return {
        "method": method,
        "seconds": seconds,
        "peak_over_model_bytes": memory,
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "time_target_met": max(ratios) <= 1.0 if rounds >= 2 else None,
        "memory_target_met": max(memory["sparselm"]) <= min(memory["reference"]),
        "mask_agreement": agree,
    }


def verdict(met: bool | None) -> str:
    return "not measured (fewer than 2 rounds)" if met is None else ("met" if met else "NOT met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each runs both sides once)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    windows = sample_windows(
        token_stream(load_tokenizer(MODEL), "ptb", "train"), args.samples, args.seqlen, args.seed, "ptb train"
    )
    rows = [compare(method, windows, args.rounds) for method in args.methods]
    if args.json:
        print(json.dumps({"model": MODEL, "samples": args.samples, "seqlen": args.seqlen, "threads": args.threads,
                          "rounds": args.rounds, "rows": rows}, indent=2))
        return
    print(f"calibrated pruning {SPARSITY} on {MODEL}: {args.samples} x {args.seqlen} PTB-train tokens (seed "
          f"{args.seed}), {args.threads} thread(s), {args.rounds} alternating round(s); median [min–max]")
    for row in rows:
        for side in ("reference", "sparselm"):
            s, mem = row["seconds"][side], row["peak_over_model_bytes"][side]
            print(f"  {row['method']:<9} {side:<9} {statistics.median(s):7.2f} s [{min(s):.2f}–{max(s):.2f}]   "
                  f"peak over model +{max(mem) / 2**30:.3f} GB")
        low, high = row["ratio_range"]
        print(f"  {row['method']:<9} sparselm / reference: {row['ratio']:.2f}x [{low:.2f}–{high:.2f}]  "
              f"target <= 1.0x: {verdict(row['time_target_met'])};  peak memory <= reference: "
              f"{verdict(row['memory_target_met'])};  keep-masks agree on {row['mask_agreement']:.4%}")


if __name__ == "__main__":
    main()
