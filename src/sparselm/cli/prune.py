"""`sparselm prune`: one pruned Hugging Face directory per requested sparsity."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..errors import SparselmError
from ..facts import parse_size
from ..io import check_output_dir
from ..models import DEVICE_HELP, resolve_device
from ..pruning import PrunedModel, PruneSettings, prune_to_dir, registered_methods, settings_from
from ._app import app
from ._common import (
    FORCE_HELP, handles_errors, model_inputs, out_console, parse_float_list, print_json, progress_bar, text_inputs,
)


def output_dirs(out: Path, sparsities: list[float | None]) -> list[Path]:
    """One value writes to DIR itself; several write DIR/s<value> (e.g. DIR/s0.5, DIR/s0.95)."""
    if len(sparsities) == 1:
        return [out]
    return [out / f"s{s:g}" for s in sparsities]


@app.command("prune")
@handles_errors
def prune_command(
    model: str = typer.Argument(..., help="Embedded alias (see `sparselm models`), local directory or hub id."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output model directory; with several sparsities, DIR/s<value>/ each."
    ),
    method: str = typer.Option("magnitude", "--method", help=f"One of: {', '.join(registered_methods())}."),
    sparsity: str = typer.Option(
        None, "--sparsity", help="Fraction of weights to remove, or a list (0.1,0.5,0.9); default 0.5, N:M fixes it."
    ),
    scope: str = typer.Option("layer", "--scope", help="global (rank all matrices together; magnitude) or layer."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, N:M (2:4 keeps 2 of 4) or block:RxC."),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or owl (outlier-weighted per block)."),
    calib: str = typer.Option(
        "ptb", "--calib", help="Calibration text: ptb, wiki, wikitext2 or text:PATH (train split)."
    ),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Number of random calibration windows."),
    calib_seqlen: int = typer.Option(None, "--calib-seqlen", help="Tokens per window; default min(2048, context)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the calibration windows."),
    reconstruct: bool = typer.Option(
        False, "--reconstruct", help="After each block is masked, train its kept weights (masks fixed) so it matches "
        "the dense block's output on the calibration text; needs calibration text, also with magnitude."
    ),
    reconstruct_epochs: int = typer.Option(
        PruneSettings.model_fields["reconstruct_epochs"].default, "--reconstruct-epochs",
        help="Passes over the calibration batches per block (per round with --steps).",
    ),
    reconstruct_lr: float = typer.Option(
        PruneSettings.model_fields["reconstruct_lr"].default, "--reconstruct-lr", help="Adam learning rate."
    ),
    steps: int = typer.Option(
        1, "--steps", help="Gradual pruning: each block reaches its target in K rounds on the cubic schedule "
        "s·(1−(1−k/K)³), re-scoring the block on its own calibration batches each round, each round followed by "
        "--reconstruct or, without it, the method's re-solve (sparsegpt, admm); N:M rounds use N = round(M·(1−s_k)). "
        "1 = one shot.",
    ),
    include_embeddings: bool = typer.Option(
        False, "--include-embeddings", help="Also prune embeddings and untied heads (by magnitude)."
    ),
    max_memory: str = typer.Option(
        None, "--max-memory", help="Prune block by block from the safetensors shards within this much memory "
        "(e.g. 200MB, 2GB); also chosen, with a note, when the weights do not fit in the available memory.",
    ),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Prune a model (magnitude, Wanda or SparseGPT) and write loadable Hugging Face directories with sparsity.json."""
    values: list[float | None] = list(parse_float_list(sparsity, "--sparsity")) if sparsity is not None else [None]
    if not values:
        raise SparselmError("--sparsity is empty; give a value such as 0.5 or a list such as 0.5,0.9")
    runs: list[PruneSettings] = [
        settings_from(
            method=method,
            sparsity=value,
            scope=scope,
            pattern=pattern,
            allocation=allocation,
            calib=calib,
            calib_samples=calib_samples,
            calib_seqlen=calib_seqlen,
            seed=seed,
            include_embeddings=include_embeddings,
            reconstruct=reconstruct, reconstruct_epochs=reconstruct_epochs, reconstruct_lr=reconstruct_lr, steps=steps,
        )
        for value in values
    ]
    limit = parse_size(max_memory) if max_memory is not None else None
    torch_device = resolve_device(device)
    inputs = model_inputs([model]) + text_inputs(calib)
    targets = output_dirs(out, values)
    for target in targets:
        check_output_dir(target, inputs, force)
    results = []
    with progress_bar(quiet=json_out) as progress:
        for settings, target in zip(runs, targets):
            label = f"{settings.method} s={settings.target_sparsity:g}"
            results.append(prune_to_dir(
                model, settings, target, progress.labelled(label), force=force, max_memory=limit, device=torch_device
            ))
    if json_out:
        summaries = [summary(r) for r in results]
        print_json(summaries[0] if len(summaries) == 1 else summaries)
        return
    for r in results:
        s = r.report.settings
        out_console.print(
            f"{s.method} {s.pattern} ({s.scope}, {s.allocation}): achieved sparsity "
            f"{r.achieved_sparsity:.4f} of {r.report.weights:,} weights in {r.report.seconds:.1f} s "
            f"→ {escape(str(r.out))}",
            highlight=False,
        )


def summary(result: PrunedModel) -> dict:
    """What --json prints for one pruned directory (sparsity.json without the per-matrix detail)."""
    report = result.report
    s = report.settings
    return {
        "out": str(result.out), "model": result.model, "method": s.method, "sparsity": report.target_sparsity,
        "scope": s.scope, "pattern": s.pattern, "allocation": s.allocation,
        "achieved_sparsity": report.achieved_sparsity, "pruned_weights": report.zeros,
        "prunable_weights": report.weights, "calibration": report.calibration, "seconds": round(report.seconds, 3),
        "notes": report.notes,
    }
