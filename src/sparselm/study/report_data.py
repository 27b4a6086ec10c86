"""What the study's report shows, as plain data: sections of text, tables and figure descriptions built from the rows.

Nothing here draws or formats markup: `report_figures` turns each `FigureData` into a PNG and the templates in
`templates/` render the sections as Markdown and HTML. Every figure comes with a table of the numbers behind it and
the settings that produced them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sources import model_slug
from .cells import ANALYSIS_DIR, DENSE
from .config import CellKind, MethodSpec
from .store import Row, canonical

MB = 1e6
DISTRIBUTION_FIGURES = {
    "weight-distribution": "histogram of weight values (log counts)",
    "weight-cdf": "CDF of |w| over all prunable matrices (log2 axis)",
    "layer-cdf": "CDF of |w| per block",
}


@dataclass(frozen=True)
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Point:
    """One measured value; `low`/`high` bound its spread when it has one (drawn as an error bar), `x_low`/`x_high`
    the spread of x (a measured speed-up); `note` is written next to the point."""

    x: float
    y: float
    low: float | None = None
    high: float | None = None
    x_low: float | None = None
    x_high: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Line:
    """A series of points; `style`: solid or dashed line through them, `points` unconnected, or `front` (a Pareto
    front: a black line ringing its points); lines with the same `colour` (an index into the colour cycle) share it."""

    label: str
    points: list[Point]
    style: str = "solid"  # solid | dashed | points | front
    colour: int | None = None


@dataclass(frozen=True)
class Reference:
    """A horizontal line across a panel (the dense model, the unpacked size, 1.0×), with its spread as a band."""

    label: str
    value: float
    style: str = "dense"  # dense | file | unity
    low: float | None = None
    high: float | None = None
    vertical: bool = False  # a vertical line at x = value instead


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: list[Line]
    references: list[Reference] = field(default_factory=list)
    log_y: bool = False
    y_range: tuple[float | None, float | None] = (None, None)
    xlabel: str = "sparsity"


@dataclass(frozen=True)
class FigureData:
    """A figure of the report: drawn from `panels`, or copied from `source` (a PNG another command drew)."""

    name: str  # file name inside DIR/figs
    caption: str
    panels: list[Panel] = field(default_factory=list)
    source: Path | None = None
    columns: int | None = None  # panels per row (None: all in one row)


@dataclass(frozen=True)
class Section:
    title: str
    text: str
    figures: list[FigureData] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass(frozen=True)
class ReportData:
    title: str
    sections: list[Section]


@dataclass(frozen=True)
class MeasuredSpeedup:
    """One speed-up as the study reports it: the median over rounds, its min–max spread and the noise verdict.

    The interface the report needs from the runtime's timing harness (`sparselm.runtime.timing.Speedup`, stored by
    `bench` as `speedup`, `speedup_low`, `speedup_high`, `within_noise`); a result stored without a spread cannot
    show that its rounds agree, so it counts as within noise.
    """

    median: float
    low: float | None
    high: float | None
    within_noise: bool

    @classmethod
    def from_bench(cls, row: dict[str, Any]) -> MeasuredSpeedup:
        low, high = row.get("speedup_low"), row.get("speedup_high")
        measured = low is not None and high is not None
        return cls(row["speedup"], low, high, bool(row.get("within_noise", True)) or not measured)

    def text(self) -> str:
        """`2.35× (2.21–2.48)`, with `, within noise` when the rounds do not agree which side is faster."""
        spread = f" ({self.low:.2f}–{self.high:.2f})" if self.low is not None and self.high is not None else " (no spread)"
        return f"{self.median:.2f}×{spread}" + (", within noise" if self.within_noise else "")


def method_label(row: Row) -> str:
    return "dense" if row.method == DENSE else method_of(row).label


def method_of(row: Row) -> MethodSpec:
    """The method (with its options) that pruned the row's model; not for the dense model's rows."""
    return MethodSpec(method=row.method, **row.options)


def is_recovered(row: Row) -> bool:
    return row.method != DENSE and method_of(row).recovered


def one_shot_key(row: Row) -> tuple[str, str, str, float, str]:
    """The key of the same measurement of the recovered row's model pruned in one shot, without recovery."""
    return (row.model, row.method, canonical(method_of(row).one_shot.options()), row.sparsity, row.task)


def report_data(meta: dict[str, str], rows: list[Row], out: Path) -> ReportData:
    """Every section of the report of the study in `out`, drawn from its rows (a study still running included)."""
    ok = [r for r in rows if r.status == "ok"]
    sections = [_overview(meta, rows)]
    for model in dict.fromkeys(r.model for r in rows):
        sections += _model_sections(model, [r for r in ok if r.model == model], out)
    sections += [_failures(rows), _timings(rows)]
    return ReportData(f"sparselm study report: {meta.get('name', 'study')}", sections)


def _overview(meta: dict[str, str], rows: list[Row]) -> Section:
    config = json.loads(meta.get("config", "{}"))
    ok = sum(r.status == "ok" for r in rows)
    packages = next((r.provenance.get("packages", {}) for r in rows), {})
    text = (
        f"Config hash `{meta.get('config_hash')}`, {ok} of {len(rows)} recorded cells succeeded. "
        f"Models: {', '.join(m['name'] for m in config.get('models', []))}. "
        f"Sparsities: {', '.join(f'{s:g}' for s in config.get('sparsities', []))}. "
        f"Calibration: {settings_text(config.get('calibration', {}))}. "
        f"Packages: {', '.join(f'{k} {v}' for k, v in packages.items() if v)}."
    )
    return Section("Overview", text)


def _model_sections(model: str, rows: list[Row], out: Path) -> list[Section]:
    slug = model_slug(model)
    sections = []
    analysis = [r for r in rows if r.kind == CellKind.ANALYZE]
    if analysis:
        sections.append(_distribution_section(slug, analysis[0], out))
    ppl = [r for r in rows if r.kind == CellKind.PERPLEXITY]
    if ppl:
        sections.append(_perplexity_section(slug, ppl))
    for task in dict.fromkeys(r.task for r in rows if r.kind == CellKind.CLASSIFICATION):
        sections.append(_classification_section(slug, task, [r for r in rows if r.task == task]))
    sizes = [r for r in rows if r.kind == CellKind.PACK]
    if sizes:
        sections.append(_size_section(slug, sizes))
    speed = [r for r in rows if r.kind == CellKind.BENCH]
    if speed:
        sections.append(_speed_section(slug, speed))
    prunes = [r for r in rows if r.kind == CellKind.PRUNE]
    if any(is_recovered(r) for r in ppl):
        sections.append(_recovery_section(slug, ppl, prunes))
    frontier = frontier_points(ppl, speed)
    if frontier:
        sections.append(_frontier_section(slug, frontier))
    if prunes:
        sections.append(_prune_section(slug, prunes))
    return sections


def _distribution_section(slug: str, row: Row, out: Path) -> Section:
    """The three weight-distribution figures per model, drawn by sparselm.analysis and copied next to the others."""
    src = out / ANALYSIS_DIR / slug
    figures = [
        FigureData(f"{slug}-{name}.png", f"{slug}: {caption}", source=src / f"{slug}-{name}.png")
        for name, caption in DISTRIBUTION_FIGURES.items()
        if (src / f"{slug}-{name}.png").is_file()
    ]
    m = row.metrics
    note = f" Weights dequantised from {m['quantized_from']}: values sit on the quantiser's grid." if m.get("quantized_from") else ""
    table = [[f"{m['weights']:,}", str(m["matrices"]), fmt(m["zero_fraction"]), fmt(m["median_abs"]), fmt(m["fraction_abs_le_2^-10"])]]
    return Section(
        f"{slug}: weight distribution",
        f"Dense weights of every prunable matrix (embeddings excluded); full statistics in {m['dir']}/.{note}",
        figures,
        [Table("summary", ["weights", "matrices", "zero fraction", "median |w|", "fraction |w| ≤ 2^-10"], table)],
    )


def _by_method(rows: Iterable[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.sparsity):
        groups[method_label(r)].append(r)
    return groups


def sweep(
    rows: list[Row], value: Callable[[Row], Point | float | None], dense_label: str
) -> tuple[list[Line], list[Reference]]:
    """One line per method over sparsity, each starting from the dense model, which is also a reference line."""
    groups = _by_method(rows)
    dense = [p for p in (_point(r, value(r)) for r in groups.pop("dense", [])) if p is not None]
    start = dense[:1]  # every method starts from the dense model
    lines = []
    for label, group in groups.items():
        points = start + [p for p in (_point(r, value(r)) for r in group) if p is not None]
        if len(points) > len(start):
            lines.append(Line(label, points))
    references = [Reference(f"{dense_label} {d.y:.4g}", d.y, "dense", d.low, d.high) for d in start]
    return lines, references


def _point(row: Row, value: Point | float | None) -> Point | None:
    if value is None or isinstance(value, Point):
        return value
    return Point(row.sparsity, value)


def _perplexity_section(slug: str, rows: list[Row]) -> Section:
    panels = []
    for task in dict.fromkeys(r.task for r in rows):
        lines, refs = sweep([r for r in rows if r.task == task], lambda r: r.metrics.get("token_ppl"), "dense")
        panels.append(Panel(f"{slug} on {task_title(task)}", "token perplexity (log scale)", lines, refs, log_y=True))
    header = ["method", "sparsity", "task", "token ppl", "word ppl", "bits/byte", "windows × seqlen"]
    table = [
        [method_label(r), f"{r.sparsity:g}", r.task, fmt(r.metrics.get("token_ppl")), fmt(r.metrics.get("word_ppl")),
         fmt(r.metrics.get("bits_per_byte")), f"{r.metrics.get('windows')} × {r.metrics.get('seqlen')}"]
        for r in ordered(rows)
    ]
    return Section(
        f"{slug}: causal-LM perplexity vs sparsity",
        f"Token perplexity (SparseGPT/Wanda protocol; word perplexity and bits per byte as lm-evaluation-harness "
        f"computes them in the table). Settings: {settings_text(rows[0].settings)}.",
        [FigureData(f"{slug}-perplexity.png", f"{slug}: token perplexity vs sparsity per method (log y; dashed: dense)", panels)],
        [Table("perplexity", header, table)],
    )


def _classification_section(slug: str, task: str, rows: list[Row]) -> Section:
    lines, refs = sweep(rows, lambda r: r.metrics.get("accuracy"), "dense")
    panel = Panel(f"{slug} on {task} after mask-keeping fine-tuning", "accuracy", lines, refs, y_range=(0, 1))
    header = ["method", "sparsity", "accuracy", "F1", "examples", "fine-tune steps", "sparsity kept"]
    table = []
    for r in ordered(rows):
        ft = r.metrics.get("finetune", {})
        table.append([
            method_label(r), f"{r.sparsity:g}", fmt(r.metrics.get("accuracy")), fmt(r.metrics.get("f1")),
            str(r.metrics.get("examples", "")), str(ft.get("steps", "")), str(ft.get("sparsity_identical", "")),
        ])
    return Section(
        f"{slug}: {task} accuracy vs sparsity",
        f"Each model fine-tuned with its pruning mask kept, then evaluated. Settings: {settings_text(rows[0].settings)}.",
        [FigureData(f"{slug}-{task}-accuracy.png", f"{slug}: {task} accuracy vs sparsity per method (dashed: dense, fine-tuned the same way)", [panel])],
        [Table(task, header, table)],
    )


def _size_section(slug: str, rows: list[Row]) -> Section:
    lines, refs = sweep(rows, lambda r: _bytes(r.metrics, "packed") and _bytes(r.metrics, "packed") / MB, "dense, packed")
    dense_file = next((_bytes(r.metrics, "dense") for r in rows if _bytes(r.metrics, "dense")), None)
    if dense_file:
        refs.append(Reference(f"unpacked weights {dense_file / MB:.4g}", dense_file / MB, "file"))
    panel = Panel(f"{slug}: packed size vs sparsity", "packed weights (MB)", lines, refs, y_range=(0, None))
    header = ["method", "sparsity", "unpacked MB", "packed MB", "ratio"]
    table = []
    for r in ordered(rows):
        dense, packed = _bytes(r.metrics, "dense"), _bytes(r.metrics, "packed")
        ratio = f"{dense / packed:.2f}×" if dense and packed else ""
        table.append([method_label(r), f"{r.sparsity:g}", fmt(dense and dense / MB), fmt(packed and packed / MB), ratio])
    return Section(
        f"{slug}: size on disk vs sparsity",
        f"`sparselm pack` output size. Settings: {settings_text(rows[0].settings)}.",
        [FigureData(f"{slug}-size.png", f"{slug}: packed size vs sparsity per method", [panel])],
        [Table("size", header, table)],
    )


def _speed_section(slug: str, rows: list[Row]) -> Section:
    measured = {r.key: speedups(r.metrics) for r in rows}
    labels = list(dict.fromkeys(k for s in measured.values() for k in s))
    panels = []
    for label in labels:

        def point(r: Row, label: str = label) -> Point | None:
            s = measured[r.key].get(label)
            return s and Point(r.sparsity, s.median, s.low, s.high)

        lines, refs = sweep(rows, point, "dense")
        refs.append(Reference("", 1.0, "unity"))
        panels.append(Panel(f"{slug}: {label}", "speedup over dense (×)", lines, refs))
    header = ["method", "sparsity", *[f"{label} speedup" for label in labels]]
    table = [
        [method_label(r), f"{r.sparsity:g}", *[_speedup_text(measured[r.key].get(label)) for label in labels]]
        for r in ordered(rows)
    ]
    rounds = sorted({r.settings.get("rounds") for r in rows if r.settings.get("rounds")})
    return Section(
        f"{slug}: runtime vs sparsity",
        f"`sparselm bench`: sparse-accelerated vs dense forward on this machine's CPU, timed in alternating rounds "
        f"({'/'.join(map(str, rounds)) or '?'} per shape). Each speedup is the median over rounds of the per-round "
        f"ratio, with its min–max range; *within noise* marks a result whose range reaches 1.0× (the rounds do not "
        f"agree which side is faster), so it is no evidence of a change. Settings: {settings_text(rows[0].settings)}.",
        [FigureData(f"{slug}-speedup.png", f"{slug}: speedup of the accelerated model over dense vs sparsity (bars: min–max over rounds)", panels)],
        [Table("speedup", header, table)],
    )


def _recovery_section(slug: str, rows: list[Row], prunes: list[Row]) -> Section:
    """Each recovered variant's perplexity beside its one-shot method's: one colour per pair, the one-shot dashed."""
    by_key = {r.key: r for r in rows}
    seconds = {r.key[:4]: r.seconds for r in prunes}
    recovered = [r for r in ordered(rows) if is_recovered(r)]
    pairs = dict.fromkeys((method_label(r), method_of(r).one_shot.label) for r in recovered)
    colours: dict[str, int] = {}
    for n, (label, one_shot) in enumerate(pairs):
        colours[label] = n
        colours.setdefault(one_shot, n)  # a one-shot method takes the colour of its first recovered variant
    styles = {label: "solid" for label, _ in pairs} | {one_shot: "dashed" for _, one_shot in pairs}
    panels = []
    for task in dict.fromkeys(r.task for r in rows):
        lines, refs = sweep([r for r in rows if r.task == task], lambda r: r.metrics.get("token_ppl"), "dense")
        shown = [
            Line(line.label, line.points, styles[line.label], colours[line.label]) for line in lines if line.label in styles
        ]
        panels.append(Panel(f"{slug} on {task_title(task)}", "token perplexity (log scale)", shown, refs, log_y=True))
    header = [
        "recovered variant", "one-shot method", "sparsity", "task", "one-shot ppl", "recovered ppl",
        "recovered / one-shot", "recovered / dense", "prune seconds (one-shot → recovered)",
    ]
    table = []
    for r in recovered:
        base = by_key.get(one_shot_key(r))
        dense = by_key.get((r.model, DENSE, "{}", 0.0, r.task))
        ppl, base_ppl = r.metrics.get("token_ppl"), base and base.metrics.get("token_ppl")
        dense_ppl = dense and dense.metrics.get("token_ppl")
        table.append([
            method_label(r), method_of(r).one_shot.label, f"{r.sparsity:g}", r.task, fmt(base_ppl), fmt(ppl),
            _ratio_text(ppl, base_ppl), _ratio_text(ppl, dense_ppl),
            f"{_seconds_text(seconds.get(one_shot_key(r)[:4]))} → {_seconds_text(seconds.get(r.key[:4]))}",
        ])
    return Section(
        f"{slug}: one-shot vs recovered perplexity",
        "Each recovered variant (block reconstruction towards the dense model's outputs on the calibration text, or "
        "gradual pruning in rounds) beside the same method pruned in one shot: same colour, the one-shot line dashed. "
        "Recovery never sees the evaluation text. Prune seconds are the prune cells' wall times in this run (one "
        f"measurement each: a rough cost, not a benchmark). Recovery settings: {_recovery_settings(recovered)}.",
        [FigureData(
            f"{slug}-recovery.png", f"{slug}: token perplexity vs sparsity, one-shot (dashed) vs recovered (solid), log y",
            panels,
        )],
        [Table("one-shot vs recovered", header, table)],
    )


def _recovery_settings(rows: list[Row]) -> str:
    """`sparsegpt +reconstruct: reconstruct_epochs=2, reconstruct_lr=0.0002` for each recovered variant."""
    settings = {}
    for r in rows:
        spec = method_of(r)
        added = {k: v for k, v in spec.options().items() if k not in spec.one_shot.options() and k != "reconstruct"}
        settings[method_label(r)] = ", ".join(f"{k}={v}" for k, v in added.items())
    return "; ".join(f"{label}: {text}" for label, text in settings.items())


def _seconds_text(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}"


def _ratio_text(value: float | None, reference: float | None) -> str:
    return ratio_text(value / reference) if value is not None and reference else ""


def ratio_text(ratio: float) -> str:
    """`1.00×`, `16.0×`, `2,345×`: three significant digits below 100, whole numbers above, never an exponent."""
    return f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:#.3g}×"


@dataclass(frozen=True)
class FrontierPoint:
    """A model's quality and speed: its perplexity over the dense model's on one task, and a measured speed-up."""

    label: str
    sparsity: float
    ratio: float
    speedup: MeasuredSpeedup

    @property
    def credited_speedup(self) -> float:
        """The speed-up the front credits: 1.0× when the rounds do not agree which side is faster (noise is no gain)."""
        return 1.0 if self.speedup.within_noise else self.speedup.median


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (speed-up, perplexity ratio) points no other point beats: none is at least as fast and at least
    as good while strictly better in one of the two. Equal points are all on the front."""
    return [
        i for i, (speed, ratio) in enumerate(points)
        if not any(s >= speed and r <= ratio and (s > speed or r < ratio) for s, r in points)
    ]


def frontier_points(ppl: list[Row], bench: list[Row]) -> dict[str, dict[str, list[FrontierPoint]]]:
    """Per perplexity task and timed shape, the frontier points: the dense model at (1, 1) (with the spread of its
    timing against itself) and every pruned model that has both a perplexity and a latency measurement."""
    timed = {r.key[:4]: speedups(r.metrics) for r in bench}
    shapes = list(dict.fromkeys(label for found in timed.values() for label in found))
    out: dict[str, dict[str, list[FrontierPoint]]] = {}
    for task in dict.fromkeys(r.task for r in ppl):
        rows = [r for r in ordered(ppl) if r.task == task and r.metrics.get("token_ppl")]
        dense = next((r.metrics["token_ppl"] for r in rows if r.method == DENSE), None)
        if dense is None:
            continue
        for shape in shapes:
            points = []
            for r in rows:
                speedup = timed.get(r.key[:4], {}).get(shape)
                if r.method == DENSE:
                    speedup = _dense_speedup(speedup)
                if speedup is not None:
                    points.append(FrontierPoint(method_label(r), r.sparsity, r.metrics["token_ppl"] / dense, speedup))
            if len(points) > 1:
                out.setdefault(task, {})[shape] = points
    return out


def _dense_speedup(measured: MeasuredSpeedup | None) -> MeasuredSpeedup:
    """Dense against itself is 1.0× by definition; the spread of its timed rounds, relative to their median, shows
    the timing noise around that point."""
    if measured is None or measured.low is None or measured.high is None:
        return MeasuredSpeedup(1.0, None, None, True)
    return MeasuredSpeedup(1.0, measured.low / measured.median, measured.high / measured.median, True)


def _frontier_section(slug: str, frontier: dict[str, dict[str, list[FrontierPoint]]]) -> Section:
    """Quality against speed: perplexity over dense vs measured speed-up, per task (rows) and timed shape (columns)."""
    shapes = list(dict.fromkeys(shape for per_shape in frontier.values() for shape in per_shape))
    labels = dict.fromkeys(p.label for per_shape in frontier.values() for points in per_shape.values() for p in points)
    colours = {label: i for i, label in enumerate(labels)}
    panels, table = [], []
    for task, per_shape in frontier.items():
        measured: dict[tuple[str, float], dict[str, FrontierPoint]] = defaultdict(dict)  # model -> shape -> point
        on_front: dict[tuple[str, float], list[str]] = defaultdict(list)
        for shape in shapes:
            points = per_shape.get(shape, [])
            front = [points[i] for i in pareto_front([(p.credited_speedup, p.ratio) for p in points])]
            for p in points:
                measured[(p.label, p.sparsity)][shape] = p
            for p in front:
                on_front[(p.label, p.sparsity)].append(shape)
            panels.append(_frontier_panel(f"{slug} on {task_title(task)}: {shape}", shape, points, front, colours))
        for (label, sparsity), per_model in measured.items():
            ratio = next(iter(per_model.values())).ratio
            table.append([
                label, f"{sparsity:g}", task, ratio_text(ratio),
                *[_speedup_text(per_model[s].speedup if s in per_model else None) for s in shapes],
                ", ".join(on_front[(label, sparsity)]) or "no",
            ])
    header = ["method", "sparsity", "task", "token ppl / dense", *[f"{s} speedup" for s in shapes], "on the Pareto front of"]
    return Section(
        f"{slug}: quality vs speed",
        "Every model with a latency measurement: its token perplexity as a ratio to the dense model's on the same task "
        "(1.0 = as good as dense) against its measured speed-up over dense (median over rounds, bars: "
        "min–max), the dense model at (1, 1) with the spread of its timing against itself (relative to its median). "
        "The black line joins the Pareto front (ringed): the models no other model beats on both speed and quality. A "
        "speed-up *within noise* counts as 1.0× when the front is chosen, since its rounds do not show it is faster. "
        "The models worth using sit right of 1.0× and near the dense line.",
        [FigureData(
            f"{slug}-frontier.png", f"{slug}: perplexity / dense vs speed-up per model (labels: sparsity; line: Pareto front)",
            panels, columns=len(shapes),
        )],
        [Table("quality vs speed", header, table)],
    )


def _frontier_panel(
    title: str, shape: str, points: list[FrontierPoint], front: list[FrontierPoint], colours: dict[str, int]
) -> Panel:
    lines = []
    for label in dict.fromkeys(p.label for p in points):
        marks = [
            Point(p.speedup.median, p.ratio, x_low=p.speedup.low, x_high=p.speedup.high,
                  note=DENSE if p.label == DENSE else f"{p.sparsity:g}")
            for p in points if p.label == label
        ]
        lines.append(Line(label, marks, "points", colours[label]))
    ordered_front = sorted(front, key=lambda p: (p.speedup.median, p.ratio))
    lines.append(Line("Pareto front", [Point(p.speedup.median, p.ratio) for p in ordered_front], "front"))
    references = [Reference("", 1.0, "unity"), Reference("", 1.0, "unity", vertical=True)]
    ratios = [p.ratio for p in points]
    log_y = max(ratios) / min(ratios) > 10  # a log axis only where the ratios span orders of magnitude
    ylabel = "token perplexity / dense" + (" (log scale)" if log_y else "")
    return Panel(title, ylabel, lines, references, log_y=log_y, xlabel=f"{shape} speedup over dense (×)")


def task_title(task: str) -> str:
    """A task as a figure title names it: `text:FILE` without the file's directories."""
    return f"text:{Path(task[5:]).name}" if task.startswith("text:") else task


def _speedup_text(speedup: MeasuredSpeedup | None) -> str:
    return speedup.text() if speedup else ""


def _prune_section(slug: str, rows: list[Row]) -> Section:
    header = ["method", "target sparsity", "achieved sparsity", "seconds", "directory"]
    table = [
        [method_label(r), f"{r.sparsity:g}", fmt(r.metrics.get("achieved_sparsity")), f"{r.seconds:.1f}", str(r.metrics.get("dir", ""))]
        for r in ordered(rows)
    ]
    return Section(f"{slug}: pruned models", "One directory per pruned model, reused by every measurement.", [], [Table("pruning", header, table)])


def _failures(rows: list[Row]) -> Section:
    failed = [r for r in rows if r.status != "ok"]
    table = [[model_slug(r.model), method_label(r), f"{r.sparsity:g}", r.task, r.error or ""] for r in failed]
    text = "None: every recorded cell succeeded." if not failed else "Run the study again to retry these cells."
    return Section("Failed cells", text, [], [Table("failed", ["model", "method", "sparsity", "task", "error"], table)] if failed else [])


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
        [Table("time per kind of cell", ["kind", "cells", "seconds", "mean seconds"], table)],
    )


# --- metric access (names as the measuring APIs report them) ------------------------------------------------------


def _bytes(metrics: dict[str, Any], which: str) -> float | None:
    """Bytes of the model's weights as stored: `dense` (plain safetensors tensors) or `packed` (sparselm pack)."""
    return metrics.get(f"{which}_bytes")


def speedups(metrics: dict[str, Any]) -> dict[str, MeasuredSpeedup]:
    """Accelerated-over-dense speedup per measured shape (prefill at each token count, and decode), with spreads."""
    found = {f"prefill {row['tokens']} tokens": MeasuredSpeedup.from_bench(row) for row in metrics.get("prefill") or []}
    if metrics.get("decode"):
        found["decode"] = MeasuredSpeedup.from_bench(metrics["decode"])
    return found


# --- text ----------------------------------------------------------------------------------------------------------


def ordered(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.method != DENSE, method_label(r), r.sparsity, r.task))


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def settings_text(settings: dict[str, Any]) -> str:
    flat = []
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            flat.append(f"{key}={value}")
    return "; ".join(flat)
