"""How much of what pruning loses recovery wins back on smollm2-135m: one-shot vs block reconstruction vs distillation
from the dense model (and both), for SparseGPT, Wanda and ADMM at 50% unstructured, 2:4 and 70% unstructured.

Protocol (defaults): calibration 32 random windows of 1024 PTB-train tokens, seed 0, drawn once and shared by every
row; evaluation: token perplexity (SparseGPT/Wanda protocol, `sparselm.evaluation.perplexity`) at seqlen 1024 on the
first 16 windows of the PTB test sentences joined with " " (the calibration domain) and of the held-out Wikipedia
lead sections (`wiki` test split, joined with "\n\n"); 2 threads. Reconstruction: `sparselm prune --reconstruct`
(Adam, masks fixed, `--reconstruct-epochs` passes at `--reconstruct-lr` per block; the other knobs are
`ReconstructSettings`' defaults: 1024-token batches, cosine decay, norms trained). Distillation: `sparselm finetune
PRUNED --task ptb --teacher smollm2-135m` (KL to the dense model's logits on PTB-train windows of `--seqlen` tokens,
mask kept) for `--distill-tokens` training tokens at `--distill-lr`. Wall time per row is the prune + recovery time
(evaluation excluded), one run on this machine: not a speed measurement.

Targets checked by the verdict lines: 50%: best ≤ 1.20× dense PTB perplexity with prune + recovery ≤ 20 min; 2:4:
best ≤ 1.45× dense; 70%: best ≤ half of one-shot SparseGPT at 70%; Wikipedia ratios improve with recovery.

Rows are cached in a JSON file keyed by a hash of the code that produces them (the package sources involved and this
script) and the settings, so an interrupted run resumes and a changed code base re-measures. `--rows` picks rows by
glob ("sparsegpt 50% *", "* reconstruct"); `--windows`/`--calib-seqlen`/`--eval-windows`/`--blocks` shrink a run
for a smoke test (numbers from a shrunk run are smoke numbers, not results). A row that was not run prints
"not measured".
Run: .venv/bin/python benchmarks/recovery_quality.py [--rows PATTERN ...] [--windows 32] [--eval-windows 16]
The README's 2:4 and 70% rows were measured with `--distill-tokens 65536` (2:4 has no time limit; 16,384 is the
50% budget that fits 20 minutes).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _code import PACKAGE, with_sources

from sparselm.data import joined_text
from sparselm.distill import Distillation
from sparselm.evaluation.perplexity import perplexity
from sparselm.finetune import finetune
from sparselm.models import load, load_tokenizer
from sparselm.pruning import prune, settings_from
from sparselm.recovery import ReconstructSettings
from sparselm.weights import find_block_lists
from sparselm.windows import sample_windows, token_stream

MODEL = "smollm2-135m"
METHODS = ("sparsegpt", "wanda", "admm")
TARGETS: dict[str, dict[str, Any]] = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}, "70%": {"sparsity": 0.7}}
VARIANTS: dict[str, tuple[bool, bool]] = {  # (block reconstruction, distillation)
    "one-shot": (False, False), "reconstruct": (True, False), "distill": (False, True), "reconstruct+distill": (True, True),
}
TEACHER = MODEL
CODE = ("pruning", "recovery", "calibration.py", "windows.py", "masks.py", "weights.py", "evaluation", "data.py",
        "models.py", "distill.py", "finetune.py")
RATIO_50, RATIO_24, MINUTES_50 = 1.20, 1.45, 20
PROTOCOL = {"windows": 32, "calib_seqlen": 1024, "eval_windows": 16, "seqlen": 1024, "blocks": None, "seed": 0,
            "threads": 2}  # the settings: verdicts only for runs made with them


def row_ids() -> list[str]:
    return ["dense"] + [f"{m} {t} {v}" for m in METHODS for t in TARGETS for v in VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=["*"], help="glob patterns of row names (default: all)")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=16, help="first N test windows of each text")
    parser.add_argument("--seqlen", type=int, default=1024, help="evaluation window length")
    parser.add_argument("--reconstruct-epochs", type=int, default=ReconstructSettings.epochs)
    parser.add_argument("--reconstruct-lr", type=float, default=ReconstructSettings.lr)
    parser.add_argument("--distill-tokens", type=int, default=16384, help="training tokens of each distillation")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-batch", type=int, default=1, help="windows per distillation step")
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/recovery_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = {k: getattr(args, k) for k in ("windows", "calib_seqlen", "eval_windows", "seqlen", "reconstruct_epochs",
                                           "reconstruct_lr", "distill_tokens", "distill_lr", "distill_batch", "blocks", "seed",
                                           "threads")}
    code = code_hash()
    cache = _load(args.results)
    chosen = [r for r in row_ids() if any(fnmatch.fnmatch(r, p) for p in args.rows)]
    tokenizer = load_tokenizer(MODEL)
    texts = {"ptb": joined_text("ptb", "test"), "wiki": joined_text("wiki", "test")}
    windows = sample_windows(token_stream(tokenizer, "ptb", "train"), args.windows, args.calib_seqlen, args.seed,
                             "ptb train")
    print(f"{MODEL}: token perplexity, seqlen {args.seqlen}, first {args.eval_windows} windows of PTB test and of "
          f"held-out Wikipedia; calibration {args.windows} x {args.calib_seqlen} PTB-train tokens, seed {args.seed}; "
          f"reconstruction {args.reconstruct_epochs} epoch(s) at lr {args.reconstruct_lr:g}; {args.threads} thread(s)"
          + (f"; SMOKE: first {args.blocks} blocks only" if args.blocks else ""), flush=True)
    rows: dict[str, dict] = {}
    for row in row_ids():
        key = row_key(code, setup, row)
        if key in cache:
            rows[row] = cache[key]
        elif row in chosen:
            rows[row] = measure(row, args, tokenizer, texts, windows)
            cache[key] = rows[row]
            _save(args.results, cache)
        if row in chosen:
            print(_line(row, rows), flush=True)
    print_tables(rows)
    shrunk = [k for k in PROTOCOL if setup[k] != PROTOCOL[k]]
    if shrunk:
        print(f"\nverdicts: not given — {', '.join(shrunk)} differ from the issue's protocol (smoke numbers)")
        return
    for line in verdicts(rows):
        print(line)


def code_hash() -> str:
    """A hash of the sources that determine a row's numbers, and of this script."""
    files = (p for name in CODE for p in ([PACKAGE / name] if name.endswith(".py") else (PACKAGE / name).rglob("*.py")))
    return with_sources(hashlib.sha256(Path(__file__).read_bytes()), files).hexdigest()[:16]


def row_key(code: str, setup: dict, row: str) -> str:
    text = json.dumps({"code": code, "setup": setup, "row": row}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def prune_fields(row: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The `prune` fields of a row (None for the dense model)."""
    if row == "dense":
        return None
    method, target, variant = row.split(" ")
    fields: dict[str, Any] = {"method": method, "seed": args.seed, **TARGETS[target]}
    if VARIANTS[variant][0]:
        fields.update(reconstruct=True, reconstruct_epochs=args.reconstruct_epochs, reconstruct_lr=args.reconstruct_lr)
    return fields


def measure(row: str, args: argparse.Namespace, tokenizer: Any, texts: dict[str, str], windows: torch.Tensor) -> dict:
    model = load(MODEL)
    if args.blocks:
        _keep_first_blocks(model, args.blocks)
    fields = prune_fields(row, args)
    started = time.perf_counter()
    sparsity = 0.0
    if fields is not None:
        sparsity = prune(model, settings_from(**fields), windows=windows).achieved_sparsity
        if VARIANTS[row.rsplit(" ", 1)[1]][1]:
            model = distilled(model, tokenizer, args)
    prune_s = time.perf_counter() - started
    ppl = {name: perplexity(model, tokenizer, text, args.seqlen, max_windows=args.eval_windows).token_ppl
           for name, text in texts.items()}
    return {"row": row, "ptb": ppl["ptb"], "wiki": ppl["wiki"], "sparsity": sparsity, "prune_s": prune_s,
            "eval_s": time.perf_counter() - started - prune_s, "fields": fields}


def distilled(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> torch.nn.Module:
    """The pruned model after `sparselm finetune --teacher` (through a temporary directory, as a user would run it)."""
    with tempfile.TemporaryDirectory(prefix="recovery-distill-") as tmp:
        student, out = Path(tmp) / "pruned", Path(tmp) / "distilled"
        model.save_pretrained(student)
        tokenizer.save_pretrained(student)
        finetune(str(student), "ptb", out, lr=args.distill_lr, batch_size=args.distill_batch, seed=args.seed,
                 seqlen=args.seqlen, distillation=Distillation(TEACHER), max_tokens=args.distill_tokens)
        return load(str(out))


def _keep_first_blocks(model: torch.nn.Module, count: int) -> None:
    """Smoke tests only: drop every block after the first `count` (the dense row is cut the same way)."""
    stack = find_block_lists(model)[0]
    del stack.blocks[count:]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def _line(row: str, rows: dict[str, dict]) -> str:
    if row not in rows:
        return f"{row:<32} not measured"
    r, dense = rows[row], rows.get("dense")
    ratios = f"  ({r['ptb'] / dense['ptb']:.3f}x / {r['wiki'] / dense['wiki']:.3f}x dense)" if dense else ""
    return (f"{row:<32} PTB {r['ptb']:9.2f}  wiki {r['wiki']:9.2f}{ratios}  sparsity {r['sparsity']:.4f}  "
            f"prune+recovery {r['prune_s']:7.1f} s")


def _cell(rows: dict[str, dict], row: str, dense: dict | None, text: str = "ptb") -> str:
    if row not in rows:
        return "not measured"
    value = rows[row][text]
    return f"{value:.2f} ({value / dense[text]:.2f}x)" if dense else f"{value:.2f}"


def best_row(rows: dict[str, dict], method: str, target: str) -> str | None:
    """The measured variant of a method and target with the lowest PTB perplexity."""
    measured = [f"{method} {target} {v}" for v in VARIANTS if f"{method} {target} {v}" in rows]
    return min(measured, key=lambda r: rows[r]["ptb"], default=None)


def print_tables(rows: dict[str, dict]) -> None:
    dense = rows.get("dense")
    print(f"\ndense: PTB {_cell(rows, 'dense', None)}, wiki {_cell(rows, 'dense', None, 'wiki')}"
          if dense else "\ndense: not measured")
    print("\n| method | target | one-shot PTB | + reconstruction | + distillation | + both | best | best wiki | "
          "best prune+recovery s |\n|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        for target in TARGETS:
            best = best_row(rows, method, target)
            cells = [_cell(rows, f"{method} {target} {v}", dense) for v in VARIANTS]
            best_cells = ([best.rsplit(" ", 1)[1] + " " + _cell(rows, best, dense), _cell(rows, best, dense, "wiki"),
                           f"{rows[best]['prune_s']:.0f}"] if best else ["not measured"] * 3)
            print(f"| {method} | {target} | " + " | ".join(cells + best_cells) + " |")


def verdicts(rows: dict[str, dict]) -> list[str]:
    dense = rows.get("dense")
    if dense is None:
        return ["\nverdicts: not measured (the dense row is needed)"]
    lines = ["\nverdicts (PTB token perplexity relative to dense):"]

    def best_at(target: str, within_s: float | None = None) -> str | None:
        found = [r for m in METHODS for v in VARIANTS if (r := f"{m} {target} {v}") in rows
                 and (within_s is None or rows[r]["prune_s"] <= within_s)]
        return min(found, key=lambda r: rows[r]["ptb"], default=None)

    def ratio_line(target: str, bound: float, within_s: float | None, what: str) -> str:
        best = best_at(target, within_s)
        if best is None:
            return f"  {target}: {what}: not measured"
        ratio = rows[best]["ptb"] / dense["ptb"]
        met = "met" if ratio <= bound else "NOT met"
        return f"  {target}: {what}: {met} — best {best}: {ratio:.3f}x dense in {rows[best]['prune_s']:.0f} s"

    lines.append(ratio_line("50%", RATIO_50, MINUTES_50 * 60, f"best <= {RATIO_50}x dense within {MINUTES_50} min"))
    lines.append(ratio_line("2:4", RATIO_24, None, f"best <= {RATIO_24}x dense"))
    reference, best70 = rows.get("sparsegpt 70% one-shot"), best_at("70%")
    if reference is None or best70 is None:
        lines.append("  70%: best <= half of one-shot SparseGPT at 70%: not measured")
    else:
        ratio = rows[best70]["ptb"] / reference["ptb"]
        lines.append(f"  70%: best <= half of one-shot SparseGPT at 70%: {'met' if ratio <= 0.5 else 'NOT met'} — "
                     f"best {best70}: {ratio:.3f}x one-shot SparseGPT")
    pairs = [(m, t) for m in METHODS for t in TARGETS
             if f"{m} {t} one-shot" in rows and (b := best_row(rows, m, t)) and not b.endswith("one-shot")]
    for method, target in pairs:
        oneshot, best = rows[f"{method} {target} one-shot"], rows[best_row(rows, method, target)]
        verdict = "improves" if best["wiki"] < oneshot["wiki"] else "does NOT improve"
        lines.append(f"  wiki, {method} {target}: recovery {verdict} the held-out ratio: "
                     f"{oneshot['wiki'] / dense['wiki']:.3f}x -> {best['wiki'] / dense['wiki']:.3f}x dense")
    if not pairs:
        lines.append("  wiki ratios with recovery: not measured")
    return lines


def _load(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, cache: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
