"""Perplexity of smollm2-135m on PTB after each pruning method, at 0.5 and 2:4, with and without OWL.

Protocol: token perplexity (SparseGPT/Wanda protocol, sparselm.evaluation.perplexity) on the PTB test
sentences joined with " ", seqlen 1024, first 16 windows; calibration: 32 random windows of 1024 PTB-train tokens,
seed 0, drawn once and shared by every method; the OWL allocation (a function of the dense model, the windows and
the target sparsity only) is computed once and shared by the OWL rows. With 2:4, OWL moves N per block; where every
block rounds back to 2 of 4 the "+ OWL" row is the uniform row's model and reuses its numbers, marked as such.
Rows print as they finish and are appended to a JSON-lines file, so an interrupted run resumes where it stopped
(rows already in the file are not recomputed).
Run: .venv/bin/python benchmarks/prune_quality.py [--seqlen 1024 --eval-windows 16 --calib-samples 32 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparselm.data import joined_text
from sparselm.evaluation.perplexity import perplexity
from sparselm.masks import NM
from sparselm.models import load, load_tokenizer
from sparselm.pruning import OwlAllocation, owl_allocation, prune, settings_from
from sparselm.windows import sample_windows, token_stream

MODEL = "smollm2-135m"
# (label, prune fields or None for the dense model)
ROWS: list[tuple[str, dict | None]] = [
    ("dense", None),
    ("magnitude global 0.5", {"method": "magnitude", "scope": "global", "sparsity": 0.5}),
    ("magnitude layer 0.5", {"method": "magnitude", "sparsity": 0.5}),
    ("magnitude 2:4", {"method": "magnitude", "pattern": "2:4"}),
    ("wanda 0.5", {"method": "wanda", "sparsity": 0.5}),
    ("wanda 2:4", {"method": "wanda", "pattern": "2:4"}),
    ("sparsegpt 0.5", {"method": "sparsegpt", "sparsity": 0.5}),
    ("sparsegpt 2:4", {"method": "sparsegpt", "pattern": "2:4"}),
    ("magnitude layer 0.5 + OWL", {"method": "magnitude", "sparsity": 0.5, "allocation": "owl"}),
    ("wanda 0.5 + OWL", {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}),
    ("sparsegpt 0.5 + OWL", {"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"}),
    ("magnitude 2:4 + OWL", {"method": "magnitude", "pattern": "2:4", "allocation": "owl"}),
    ("wanda 2:4 + OWL", {"method": "wanda", "pattern": "2:4", "allocation": "owl"}),
    ("sparsegpt 2:4 + OWL", {"method": "sparsegpt", "pattern": "2:4", "allocation": "owl"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=1024, help="evaluation window length")
    parser.add_argument("--eval-windows", type=int, default=16, help="first N test windows")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/prune_quality.jsonl"))
    parser.add_argument("--only", nargs="*", help="labels of the rows to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = {k: getattr(args, k) for k in ("seqlen", "eval_windows", "calib_samples", "calib_seqlen", "seed")}
    done = _load_done(args.results, setup)
    tokenizer = load_tokenizer(MODEL)
    test_text = joined_text("ptb", "test")
    windows = sample_windows(
        token_stream(tokenizer, "ptb", "train"), args.calib_samples, args.calib_seqlen, args.seed, "ptb train"
    )
    print(f"{MODEL} on PTB test: token perplexity, seqlen {args.seqlen}, first {args.eval_windows} windows; "
          f"calibration {args.calib_samples} x {args.calib_seqlen} PTB-train tokens, seed {args.seed}; "
          f"{args.threads} thread(s)", flush=True)
    owl: dict[float, OwlAllocation] = {}  # by target sparsity
    for label, fields in ROWS:
        if args.only and label not in args.only:
            continue
        if label not in done:
            allocation = None
            if fields and fields.get("allocation") == "owl":
                settings = settings_from(**fields)
                if settings.target_sparsity not in owl:
                    owl[settings.target_sparsity] = owl_allocation(load(MODEL), settings, windows)
                allocation = owl[settings.target_sparsity]
                same = _same_model_row(label, fields, allocation, done)
                if same is not None:
                    done[label] = same
            if label not in done:
                done[label] = _run_row(label, fields, tokenizer, test_text, windows, args, allocation)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as fh:
                fh.write(json.dumps({"setup": setup, **done[label]}) + "\n")
        r = done[label]
        print(f"{label:<28} ppl {r['token_ppl']:>12.2f}  sparsity {r['sparsity']:.4f}  {_how(r)}", flush=True)
    _table(done, args.only)


def _run_row(
    label: str, fields: dict | None, tokenizer, text: str, windows: torch.Tensor, args, owl: OwlAllocation | None
) -> dict:
    model = load(MODEL)
    t = time.perf_counter()
    sparsity = 0.0
    if fields is not None:
        sparsity = prune(model, windows=windows, owl=owl, **fields).achieved_sparsity
    prune_s = time.perf_counter() - t
    result = perplexity(model, tokenizer, text, args.seqlen, max_windows=args.eval_windows)
    return {"label": label, "token_ppl": result.token_ppl, "sparsity": sparsity, "prune_s": prune_s}


def _same_model_row(label: str, fields: dict, owl: OwlAllocation, done: dict[str, dict]) -> dict | None:
    """With N:M, OWL moves N per block; when every block rounds back to the uniform N:M, the pruned model is the
    uniform row's own (same method, windows and per-matrix pattern), so its measured numbers are reused, marked."""
    uniform_label = label.removesuffix(" + OWL")
    pattern = settings_from(**fields).parsed_pattern
    if not isinstance(pattern, NM) or uniform_label not in done:
        return None
    if set(owl.block_patterns(pattern).values()) != {str(pattern)}:
        return None
    return {**done[uniform_label], "label": label, "prune_s": None, "same_model_as": uniform_label}


def _how(row: dict) -> str:
    if row.get("same_model_as"):
        return f"OWL's per-block N:M all round to the uniform pattern: the model of '{row['same_model_as']}'"
    return f"prune {row['prune_s']:7.1f} s"


def _load_done(path: Path, setup: dict) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["label"]: r for r in rows if r.get("setup") == setup}


def _table(done: dict[str, dict], only: list[str] | None) -> None:
    print("\n| method | sparsity | PTB token ppl | prune time (s) |\n|---|---|---|---|")
    for label, _ in ROWS:
        if label in done and (not only or label in only):
            r = done[label]
            seconds = f"{r['prune_s']:.1f}" if r["prune_s"] is not None else f"(same model as {r['same_model_as']})"
            print(f"| {label} | {r['sparsity']:.4f} | {r['token_ppl']:.2f} | {seconds} |")


if __name__ == "__main__":
    main()
