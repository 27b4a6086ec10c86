"""`sparselm pack` / `sparselm unpack`: sparse model directories that are really smaller, and back."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..errors import SparselmError
from ..io import check_output_dir
from ..storage import FORMATS, pack, unpack
from ._app import app
from ._common import FORCE_HELP, handles_errors, model_inputs, out_console, print_json, progress_bar


@app.command("pack")
@handles_errors
def pack_command(
    model: str = typer.Argument(..., help="Model directory (or embedded alias / hub id) with safetensors weights."),
    out: Path = typer.Option(..., "--out", "-o", help="Packed directory to write (replaced atomically)."),
    format: str = typer.Option(
        "auto",
        "--format",
        help=f"Codec: {'|'.join(FORMATS)}; auto keeps the smallest per tensor. compressed-tensors writes its "
        "sparse-bitmask layout, read by compressed-tensors<=0.12 and transformers 4.5x; transformers 5 does not "
        "read it (it loads random weights): unpack first or use sparselm.load.",
    ),
    dtype: str = typer.Option(
        "keep",
        "--dtype",
        help="Value dtype: keep|fp16|bf16|int8 (fp16/bf16 round the values; int8 stores the block matrices as "
        "weight-only int8 with a scale per output channel, pruned positions staying zero; sparselm's layout only).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print sizes as JSON on stdout."),
) -> None:
    """Store a (pruned) model with sparse codecs in safetensors plus a checksummed manifest."""
    check_output_dir(out, model_inputs([model]), force)
    with progress_bar(quiet=json_out) as progress:
        summary = pack(model, out, format=format, dtype=dtype, progress=progress.labelled(model), force=force)
    if json_out:
        print_json(summary.to_json())
        return
    sizes = summary.sizes
    if sizes.message:
        progress.note(sizes.message)
    if format == "compressed-tensors":
        progress.note(
            "transformers 5 does not read sparse-bitmask and would load this directory with random block matrices; "
            "read it with compressed-tensors<=0.12 and transformers 4.5x, or with sparselm.load"
        )
    codecs = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.codecs.items()))
    out_console.print(
        f"packed {sizes.tensors} tensors ({codecs}): weights {sizes.dense_bytes / 1e6:.2f} MB → "
        f"{sizes.packed_bytes / 1e6:.2f} MB ({sizes.ratio:.2f}× smaller); files "
        f"{summary.file_bytes_dense / 1e6:.2f} MB → {summary.file_bytes_packed / 1e6:.2f} MB "
        f"→ {escape(str(summary.out))}",
        highlight=False,
    )


@app.command("unpack")
@handles_errors
def unpack_command(
    packed: Path = typer.Argument(..., help="A directory written by sparselm pack."),
    out: Path = typer.Option(..., "--out", "-o", help="Dense model directory to write (replaced atomically)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Rebuild the dense model directory bit-exactly (checksums are verified first)."""
    if not packed.is_dir():
        raise SparselmError(f"no directory at '{packed}'; pass a directory written by sparselm pack")
    check_output_dir(out, [packed], force)
    with progress_bar(quiet=json_out) as progress:
        summary = unpack(packed, out, progress=progress.labelled(str(packed)), force=force)
    if json_out:
        print_json(summary.to_json())
        return
    out_console.print(
        f"unpacked {summary.tensors} tensors into {', '.join(summary.files)} → {escape(str(summary.out))}",
        highlight=False,
    )
