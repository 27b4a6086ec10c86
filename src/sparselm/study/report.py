"""The study's report: figures in DIR/figs/, DIR/report.md (linking them) and DIR/report.html (figures embedded).

Everything is drawn from the results store, so `sparselm report DIR` can be run at any time, on a finished study or
on one still running; every figure has a table with the numbers behind it and the settings that produced them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_write_bytes, atomic_write_text, ensure_writable_dir  # noqa: E402
from ..models import model_slug  # noqa: E402
from .cells import ANALYSIS_DIR, DENSE  # noqa: E402
from .config import MethodSpec  # noqa: E402
from .store import ResultStore, Row  # noqa: E402

FIGS_DIR = "figs"
MB = 1e6


@dataclass
class Figure:
    path: Path  # inside DIR/figs
    caption: str


@dataclass
class Section:
    title: str
    text: str
    figures: list[Figure]
    tables: list[tuple[str, list[str], list[list[str]]]]  # (caption, header, rows)


def method_label(row: Row) -> str:
    return "dense" if row.method == DENSE else MethodSpec(method=row.method, **row.options).label


def write_report(out: Path) -> Path:
    """Draw every figure and write report.md and report.html; returns the HTML path."""
    out = Path(out)
    store = ResultStore.open_existing(out)
    rows = store.rows()
    meta = store.meta()
    figs = ensure_writable_dir(out / FIGS_DIR)
    ok = [r for r in rows if r.status == "ok"]
    sections = [_overview(meta, rows)]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in ok if r.model == model]
        sections += _model_sections(model, mine, out, figs)
    sections.append(_failures(rows))
    sections.append(_timings(rows))
    title = f"sparselm study report: {meta.get('name', 'study')}"
    atomic_write_text(out / "report.md", _markdown(title, sections, out))
    atomic_write_text(out / "report.html", _html(title, sections, out))
    return out / "report.html"


# --- sections ------------------------------------------------------------------------------------------------------


def _overview(meta: dict[str, str], rows: list[Row]) -> Section:
    config = json.loads(meta.get("config", "{}"))
    ok = sum(r.status == "ok" for r in rows)
    packages = next((r.provenance.get("packages", {}) for r in rows), {})
    text = (
        f"Config hash `{meta.get('config_hash')}`, {ok} of {len(rows)} recorded cells succeeded. "
        f"Models: {', '.join(m['name'] for m in config.get('models', []))}. "
        f"Sparsities: {', '.join(f'{s:g}' for s in config.get('sparsities', []))}. "
        f"Calibration: {_settings_text(config.get('calibration', {}))}. "
        f"Packages: {', '.join(f'{k} {v}' for k, v in packages.items() if v)}."
    )
    return Section("Overview", text, [], [])


def _model_sections(model: str, rows: list[Row], out: Path, figs: Path) -> list[Section]:
    slug = model_slug(model)
    sections = []
    analysis = [r for r in rows if r.task == "analyze"]
    if analysis:
        sections.append(_distribution_section(slug, analysis[0], out, figs))
    ppl = [r for r in rows if r.kind == "perplexity"]
    if ppl:
        sections.append(_perplexity_section(slug, ppl, figs))
    for task in dict.fromkeys(r.task for r in rows if r.kind == "classification"):
        sections.append(_classification_section(slug, task, [r for r in rows if r.task == task], figs))
    sizes = [r for r in rows if r.task == "pack"]
    if sizes:
        sections.append(_size_section(slug, sizes, figs))
    speed = [r for r in rows if r.task == "bench"]
    if speed:
        sections.append(_speed_section(slug, speed, figs))
    prunes = [r for r in rows if r.task == "prune"]
    if prunes:
        sections.append(_prune_section(slug, prunes))
    return sections


def _distribution_section(slug: str, row: Row, out: Path, figs: Path) -> Section:
    """The seed's three figures per model, drawn by sparselm.analysis and copied next to the others."""
    src = out / ANALYSIS_DIR / slug
    captions = {
        "weight-distribution": "histogram of weight values (log counts)",
        "weight-cdf": "CDF of |w| over all prunable matrices (log2 axis)",
        "layer-cdf": "CDF of |w| per block",
    }
    figures = []
    for name, caption in captions.items():
        png = src / f"{slug}-{name}.png"
        if png.is_file():
            shutil.copyfile(png, figs / png.name)
            figures.append(Figure(figs / png.name, f"{slug}: {caption}"))
    m = row.metrics
    note = f" Weights dequantised from {m['quantized_from']}: values sit on the quantiser's grid." if m.get("quantized_from") else ""
    table = [[f"{m['weights']:,}", str(m["matrices"]), _fmt(m["zero_fraction"]), _fmt(m["median_abs"]), _fmt(m["fraction_abs_le_2^-10"])]]
    return Section(
        f"{slug}: weight distribution",
        f"Dense weights of every prunable matrix (embeddings excluded); full statistics in {row.metrics['dir']}/.{note}",
        figures,
        [("summary", ["weights", "matrices", "zero fraction", "median |w|", "fraction |w| ≤ 2^-10"], table)],
    )


def _by_method(rows: Iterable[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.sparsity):
        groups[method_label(r)].append(r)
    return groups


def _sweep_axes(ax: plt.Axes, rows: list[Row], value: Any, dense_label: str) -> None:
    """One line per method over sparsity, with the dense model drawn as a dashed horizontal line."""
    groups = _by_method(rows)
    dense = groups.pop("dense", [])
    dense_values = [value(r) for r in dense if value(r) is not None]
    start = [(0.0, dense_values[0])] if dense_values else []  # every method starts from the dense model
    for label, group in groups.items():
        points = start + [(r.sparsity, value(r)) for r in group if value(r) is not None]
        if len(points) > len(start):
            ax.plot(*zip(*points), marker="o", label=label)
    if dense_values:
        ax.axhline(dense_values[0], color="black", ls="--", lw=1, label=f"{dense_label} {dense_values[0]:.4g}")
    ax.set_xlabel("sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _perplexity_section(slug: str, rows: list[Row], figs: Path) -> Section:
    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _sweep_axes(ax, [r for r in rows if r.task == task], lambda r: r.metrics.get("token_ppl"), "dense")
        ax.set_yscale("log")
        ax.set_ylabel("token perplexity (log scale)")
        ax.set_title(f"{slug} on {task}")
    path = _save(fig, figs / f"{slug}-perplexity.png")
    header = ["method", "sparsity", "task", "token ppl", "word ppl", "bits/byte", "windows × seqlen"]
    table = [
        [method_label(r), f"{r.sparsity:g}", r.task, _fmt(r.metrics.get("token_ppl")), _fmt(r.metrics.get("word_ppl")),
         _fmt(r.metrics.get("bits_per_byte")), f"{r.metrics.get('windows')} × {r.metrics.get('seqlen')}"]
        for r in _ordered(rows)
    ]
    return Section(
        f"{slug}: causal-LM perplexity vs sparsity",
        f"Token perplexity (SparseGPT/Wanda protocol; word perplexity and bits per byte as lm-evaluation-harness "
        f"computes them in the table). Settings: {_settings_text(rows[0].settings)}.",
        [Figure(path, f"{slug}: token perplexity vs sparsity per method (log y; dashed: dense)")],
        [("perplexity", header, table)],
    )


def _classification_section(slug: str, task: str, rows: list[Row], figs: Path) -> Section:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _sweep_axes(ax, rows, lambda r: r.metrics.get("accuracy"), "dense")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{slug} on {task} after mask-keeping fine-tuning")
    path = _save(fig, figs / f"{slug}-{task}-accuracy.png")
    header = ["method", "sparsity", "accuracy", "F1", "examples", "fine-tune steps", "sparsity kept"]
    table = []
    for r in _ordered(rows):
        ft = r.metrics.get("finetune", {})
        table.append([
            method_label(r), f"{r.sparsity:g}", _fmt(r.metrics.get("accuracy")), _fmt(r.metrics.get("f1")),
            str(r.metrics.get("examples", "")), str(ft.get("steps", "")),
            str(ft.get("sparsity_identical", "")),
        ])
    return Section(
        f"{slug}: {task} accuracy vs sparsity",
        f"Each model fine-tuned with its pruning mask kept, then evaluated. Settings: {_settings_text(rows[0].settings)}.",
        [Figure(path, f"{slug}: {task} accuracy vs sparsity per method (dashed: dense, fine-tuned the same way)")],
        [(task, header, table)],
    )


def _size_section(slug: str, rows: list[Row], figs: Path) -> Section:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _sweep_axes(ax, rows, lambda r: _bytes(r.metrics, "packed") and _bytes(r.metrics, "packed") / MB, "dense, packed")
    dense_file = next((_bytes(r.metrics, "dense") for r in rows if _bytes(r.metrics, "dense")), None)
    if dense_file:
        ax.axhline(dense_file / MB, color="grey", ls=":", lw=1, label=f"unpacked weights {dense_file / MB:.4g}")
        ax.legend(fontsize=8)
    ax.set_ylabel("packed weights (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{slug}: packed size vs sparsity")
    path = _save(fig, figs / f"{slug}-size.png")
    header = ["method", "sparsity", "unpacked MB", "packed MB", "ratio"]
    table = []
    for r in _ordered(rows):
        dense, packed = _bytes(r.metrics, "dense"), _bytes(r.metrics, "packed")
        ratio = f"{dense / packed:.2f}×" if dense and packed else ""
        table.append([method_label(r), f"{r.sparsity:g}", _fmt(dense and dense / MB), _fmt(packed and packed / MB), ratio])
    return Section(
        f"{slug}: size on disk vs sparsity",
        f"`sparselm pack` output size. Settings: {_settings_text(rows[0].settings)}.",
        [Figure(path, f"{slug}: packed size vs sparsity per method")],
        [("size", header, table)],
    )


def _speed_section(slug: str, rows: list[Row], figs: Path) -> Section:
    points = {r.key: _speedups(r.metrics) for r in rows}
    labels = list(dict.fromkeys(k for s in points.values() for k in s))
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(6 * max(1, len(labels)), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        _sweep_axes(ax, rows, lambda r, label=label: points[r.key].get(label), "dense")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_ylabel("speedup over dense (×)")
        ax.set_title(f"{slug}: {label}")
    path = _save(fig, figs / f"{slug}-speedup.png")
    header = ["method", "sparsity", *[f"{label} speedup" for label in labels]]
    table = [
        [method_label(r), f"{r.sparsity:g}", *[_fmt(points[r.key].get(label)) for label in labels]]
        for r in _ordered(rows)
    ]
    return Section(
        f"{slug}: runtime vs sparsity",
        f"`sparselm bench`: sparse-accelerated vs dense forward on this machine's CPU. "
        f"Settings: {_settings_text(rows[0].settings)}.",
        [Figure(path, f"{slug}: speedup of the accelerated model over dense vs sparsity")],
        [("speedup", header, table)],
    )


def _prune_section(slug: str, rows: list[Row]) -> Section:
    header = ["method", "target sparsity", "achieved sparsity", "seconds", "directory"]
    table = [
        [method_label(r), f"{r.sparsity:g}", _fmt(_achieved(r.metrics)), f"{r.seconds:.1f}", str(r.metrics.get("dir", ""))]
        for r in _ordered(rows)
    ]
    return Section(f"{slug}: pruned models", "One directory per pruned model, reused by every measurement.", [], [("pruning", header, table)])


def _failures(rows: list[Row]) -> Section:
    failed = [r for r in rows if r.status != "ok"]
    table = [[model_slug(r.model), method_label(r), f"{r.sparsity:g}", r.task, r.error or ""] for r in failed]
    text = "None: every recorded cell succeeded." if not failed else "Run the study again to retry these cells."
    return Section("Failed cells", text, [], [("failed", ["model", "method", "sparsity", "task", "error"], table)] if failed else [])


def _timings(rows: list[Row]) -> Section:
    per_kind: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        per_kind[r.kind].append(r.seconds)
    table = [[k, str(len(v)), f"{sum(v):.1f}", f"{sum(v) / len(v):.1f}"] for k, v in per_kind.items()]
    total = sum(r.seconds for r in rows)
    return Section(
        "Timings",
        f"Cell seconds summed: {total:.0f} s (cells may run in parallel). Report written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        [],
        [("time per kind of cell", ["kind", "cells", "seconds", "mean seconds"], table)],
    )


# --- metric access (names as the measuring APIs report them) ------------------------------------------------------


def _bytes(metrics: dict[str, Any], which: str) -> float | None:
    """Bytes of the model's weights as stored: `dense` (plain safetensors tensors) or `packed` (sparselm pack)."""
    return metrics.get(f"{which}_bytes")


def _speedups(metrics: dict[str, Any]) -> dict[str, float]:
    """Accelerated-over-dense speedup per measured shape: prefill at each token count, and decode."""
    found = {f"prefill {row['tokens']} tokens": row["speedup"] for row in metrics.get("prefill") or []}
    if metrics.get("decode"):
        found["decode"] = metrics["decode"]["speedup"]
    return found


def _achieved(metrics: dict[str, Any]) -> float | None:
    return metrics.get("achieved_sparsity")


# --- rendering -----------------------------------------------------------------------------------------------------


def _ordered(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.method != DENSE, method_label(r), r.sparsity, r.task))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _settings_text(settings: dict[str, Any]) -> str:
    flat = []
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            flat.append(f"{key}={value}")
    return "; ".join(flat)


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _markdown(title: str, sections: list[Section], out: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", "", s.text, ""]
        for f in s.figures:
            lines += [f"![{f.caption}]({f.path.relative_to(out).as_posix()})", ""]
        for caption, header, rows in s.tables:
            lines += [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
            lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in rows]
            lines.append("")
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
table { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; } th { background: #f3f3f3; }
"""


def _html(title: str, sections: list[Section], out: Path) -> str:
    """One file with every figure inlined as a data: URI, so it can be mailed or archived on its own."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s.text))
        parts.append(f"<section><h2>{html.escape(s.title)}</h2><p>{text}</p>")
        for f in s.figures:
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f.caption)}">'
                f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
            )
        for caption, header, rows in s.tables:
            parts.append(f"<table><caption>{html.escape(caption)}</caption><tr>")
            parts += [f"<th>{html.escape(h)}</th>" for h in header]
            parts.append("</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
