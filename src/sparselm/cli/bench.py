"""`sparselm bench` and `sparselm run`: the sparse runtime, measured and used."""

from __future__ import annotations

import typer
from rich.table import Table

from ..errors import SparselmError
from ..models import resolve_device
from ..runtime import POLICIES, BenchResult, SpeedRow, bench, generate
from ..runtime.accelerate import DTYPES, check_settings
from ..runtime.generate import check_generation
from ..runtime.quality import MAX_PERPLEXITY_CHANGE, QualityCheck
from ._app import app
from ._common import handles_errors, out_console, parse_int_list, print_json, progress_bar


REMEASURE_HELP = "Measure every layer's kernels again instead of using the cached dispatch decisions."
DTYPE_HELP = (
    f"What the accelerated model computes in: {'|'.join(DTYPES)} (int8: weight-only, a scale per output row; "
    "activations stay fp32; w8a8: int8 activations too, offered only with its measured perplexity change and "
    "refused above 2%). Dense and sparse are measured per layer in that dtype."
)


@app.command("bench")
@handles_errors
def bench_command(
    model: str = typer.Argument(..., help="Model directory (plain or packed), embedded alias or hub id."),
    tokens: str = typer.Option("1,128,512", "--tokens", help="Prefill token counts, comma-separated."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: torch's current setting)."),
    policy: str = typer.Option("auto", "--policy", help=f"Runtime policy: {'|'.join(POLICIES)}."),
    rounds: int = typer.Option(
        5, "--rounds", help="Alternating timing rounds (the median is reported with the range over rounds)."
    ),
    no_size: bool = typer.Option(False, "--no-size", help="Skip the packed-size measurement."),
    remeasure: bool = typer.Option(False, "--remeasure", help=REMEASURE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu (the sparse runtime runs on the CPU; cuda is refused)."),
    json_out: bool = typer.Option(False, "--json", help="Print all results as JSON on stdout."),
) -> None:
    """File size and prefill/decode speed, dense (fp32 and bf16) vs accelerated, with each layer's kernel."""
    if resolve_device(device).type != "cpu":
        raise SparselmError("bench measures sparselm's CPU sparse runtime; use --device cpu")
    counts = parse_int_list(tokens, "--tokens")
    if not counts or min(counts) < 1:
        raise SparselmError(f"--tokens needs positive integers, got '{tokens}'")
    if rounds < 1:
        raise SparselmError(f"--rounds must be at least 1, got {rounds}")
    check_settings(policy, threads, dtype)
    with progress_bar(quiet=json_out) as progress:
        result = bench(
            model, counts, threads=threads, policy=policy, rounds=rounds, measure_size=not no_size,
            progress=progress.labelled(model), remeasure=remeasure, dtype=dtype,
        )
    for note in result.notes:
        progress.note(note)
    if json_out:
        print_json(result.to_json())
        return
    print_bench(result)
    print_quality(result.w8a8_quality)


def print_bench(result: BenchResult) -> None:
    report = result.report
    title = (f"{result.model}: dense vs accelerated {report.dtype} ({report.threads} threads, policy {report.policy}, "
             f"kernels {report.kernel_path})")
    table = Table(title=title, caption=f"medians of {result.rounds} alternating rounds (range over the rounds)")
    for col in ("step", "tokens", "model", "ms", "accelerated speed-up over it"):
        table.add_column(col, justify="right")
    rows = [("prefill", r) for r in result.prefill] + ([("decode", result.decode)] if result.decode else [])
    for step, r in rows:
        table.add_row(step, str(r.tokens), "dense fp32", ms_with_range(r.dense_ms, r.dense_ms_low, r.dense_ms_high),
                      speedup_text(r))
        if r.dense_bf16_ms is not None:
            table.add_row("", "", "dense bf16",
                          ms_with_range(r.dense_bf16_ms, r.dense_bf16_ms_low, r.dense_bf16_ms_high),
                          ratio_text(r.speedup_over_bf16, r.speedup_over_bf16_low, r.speedup_over_bf16_high,
                                     r.within_noise_over_bf16))
        if r.dense_w8a8_ms is not None:
            table.add_row("", "", "dense w8a8",
                          ms_with_range(r.dense_w8a8_ms, r.dense_w8a8_ms_low, r.dense_w8a8_ms_high),
                          ratio_text(r.speedup_over_w8a8, r.speedup_over_w8a8_low, r.speedup_over_w8a8_high,
                                     r.within_noise_over_w8a8))
        table.add_row("", "", f"accelerated {report.dtype}",
                      ms_with_range(r.accelerated_ms, r.accelerated_ms_low, r.accelerated_ms_high),
                      f"{r.accelerated_tokens_per_s:.1f} tokens/s", end_section=True)
    out_console.print(table)
    out_console.print(f"layers on a sparse kernel: {report.replaced} of {report.layers_total}; choices per token "
                      f"count: {report.choices}; groups of layers sharing one product: {len(report.fused_groups)}")
    if result.size is not None:
        s = result.size
        out_console.print(f"weights: dense {s.dense_bytes / 1e6:.2f} MB, packed {s.packed_bytes / 1e6:.2f} MB "
                          f"({s.dense_bytes / max(s.packed_bytes, 1):.2f}× smaller, {s.source})")


def print_quality(check: QualityCheck | None) -> None:
    """The measured perplexity change of w8a8, shown whenever it was measured."""
    if check is not None:
        out_console.print(f"{check.describe()}; allowed up to {MAX_PERPLEXITY_CHANGE:.0%}")


def ms_with_range(median: float, low: float, high: float) -> str:
    return f"{median:.2f} ({low:.2f}–{high:.2f})"


def speedup_text(row: SpeedRow) -> str:
    return ratio_text(row.speedup, row.speedup_low, row.speedup_high, row.within_noise)


def ratio_text(median: float, low: float, high: float, within_noise: bool) -> str:
    noise = ", within noise" if within_noise else ""
    return f"{median:.2f}× ({low:.2f}–{high:.2f}{noise})"


@app.command("run")
@handles_errors
def run_command(
    model: str = typer.Argument(..., help="Causal LM directory (plain or packed), embedded alias or hub id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate (greedy)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads."),
    policy: str = typer.Option("auto", "--policy", help=f"Runtime policy: {'|'.join(POLICIES)}."),
    remeasure: bool = typer.Option(False, "--remeasure", help=REMEASURE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the text and layer choices as JSON."),
) -> None:
    """Generate text with the accelerated model (sparse kernels where they measured faster)."""
    check_generation(model, prompt, max_new_tokens, policy, threads, dtype)
    with progress_bar(quiet=json_out) as progress:
        result = generate(
            model, prompt, max_new_tokens, policy=policy, threads=threads, remeasure=remeasure,
            progress=progress.labelled(model), dtype=dtype,
        )
    report = result.report
    for note in report.notes:
        progress.note(note)
    if json_out:
        out = {"prompt": prompt, "completion": result.completion, "replaced": report.replaced,
               "choices": report.choices}
        if result.w8a8_quality is not None:
            out["w8a8_quality"] = result.w8a8_quality.to_json()
        print_json(out)
        return
    out_console.print(f"[bold]{prompt}[/bold]{result.completion}", highlight=False)
    out_console.print(f"[dim]{report.replaced} of {report.layers_total} layers on sparse kernels[/dim]")
    print_quality(result.w8a8_quality)
