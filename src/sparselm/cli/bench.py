"""`sparselm bench` and `sparselm run`: the sparse runtime, measured and used."""

from __future__ import annotations

import typer
from rich.table import Table

from ..errors import SparselmError
from ..runtime import POLICIES, accelerate, bench
from . import app
from ._common import handles_errors, out_console, parse_int_list, print_json, progress_bar


@app.command("bench")
@handles_errors
def bench_command(
    model: str = typer.Argument(..., help="Model directory (plain or packed), embedded alias or hub id."),
    tokens: str = typer.Option("1,128,512", "--tokens", help="Prefill token counts, comma-separated."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: torch's current setting)."),
    policy: str = typer.Option("auto", "--policy", help=f"Runtime policy: {'|'.join(POLICIES)}."),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved timing rounds (the median is reported)."),
    no_size: bool = typer.Option(False, "--no-size", help="Skip the packed-size measurement."),
    json_out: bool = typer.Option(False, "--json", help="Print all results as JSON on stdout."),
) -> None:
    """File size and prefill/decode speed, dense vs accelerated, with the kernel chosen for each layer."""
    counts = parse_int_list(tokens, "--tokens")
    if not counts or min(counts) < 1:
        raise SparselmError(f"--tokens needs positive integers, got '{tokens}'")
    if rounds < 1:
        raise SparselmError(f"--rounds must be at least 1, got {rounds}")
    with progress_bar(quiet=json_out) as progress:
        task = progress.add_task(f"benchmarking {model}", total=None)
        result = bench(
            model, counts, threads=threads, policy=policy, rounds=rounds, measure_size=not no_size,
            progress=lambda _n: progress.advance(task),
        )
    if json_out:
        print_json(result)
        return
    print_bench(result)


def print_bench(result: dict) -> None:
    title = f"{result['model']}: dense vs accelerated ({result['threads']} threads, policy {result['policy']})"
    table = Table(title=title)
    for col in ("step", "tokens", "dense ms", "accelerated ms", "speed-up", "accelerated tokens/s"):
        table.add_column(col, justify="right")
    rows = [("prefill", r) for r in result["prefill"]] + ([("decode", result["decode"])] if result["decode"] else [])
    for step, r in rows:
        table.add_row(
            step, str(r["tokens"]), f"{r['dense_ms']:.2f}", f"{r['accelerated_ms']:.2f}", f"{r['speedup']:.2f}×",
            f"{r['accelerated_tokens_per_s']:.1f}",
        )
    out_console.print(table)
    layers = result["layers"]
    out_console.print(f"layers on a sparse kernel: {layers['replaced']} of {layers['total']}; choices per token count: "
                      f"{layers['choices']}; groups of layers sharing one product: {layers['fused_groups']}")
    if "size" in result:
        s = result["size"]
        out_console.print(f"weights: dense {s['dense_bytes'] / 1e6:.2f} MB, packed {s['packed_bytes'] / 1e6:.2f} MB "
                          f"({s['dense_bytes'] / max(s['packed_bytes'], 1):.2f}× smaller, {s['source']})")


@app.command("run")
@handles_errors
def run_command(
    model: str = typer.Argument(..., help="Causal LM directory (plain or packed), embedded alias or hub id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate (greedy)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads."),
    policy: str = typer.Option("auto", "--policy", help=f"Runtime policy: {'|'.join(POLICIES)}."),
    json_out: bool = typer.Option(False, "--json", help="Print the text and layer choices as JSON."),
) -> None:
    """Generate text with the accelerated model (sparse kernels where they measured faster)."""
    import torch

    from ..models import load, load_tokenizer

    if max_new_tokens < 1:
        raise SparselmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    with progress_bar(quiet=json_out) as progress:
        task = progress.add_task(f"loading and accelerating {model}", total=None)
        lm = load(model, head="causal-lm")
        tokenizer = load_tokenizer(model)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        report = accelerate(lm, policy, tokens=(1, ids.shape[1]), threads=threads,
                            progress=lambda _n: progress.advance(task))
    with torch.inference_mode():
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if json_out:
        print_json({"prompt": prompt, "completion": text, "replaced": report["replaced"], "choices": report["choices"]})
        return
    out_console.print(f"[bold]{prompt}[/bold]{text}", highlight=False)
    out_console.print(f"[dim]{report['replaced']} of {report['layers_total']} layers on sparse kernels[/dim]")
