"""What one cell of the study is and what it does.

A cell is (model, method, options, sparsity, task). `plan` lists them in an order where every cell comes after the
prune cell whose model it measures; `run_cell` does one, calling the toolkit's own APIs (pruning, evaluation,
fine-tuning, packing, benchmarking, analysis) exactly as a user would, and returns JSON-able metrics.

Pruned models live in a shared directory, DIR/models/<model>/<method>-s<sparsity>/, written atomically by
`prune_to_dir`; a later cell (or a restarted study, or a Ray worker on another node sharing DIR) reuses a complete one.
Scratch outputs (fine-tuned and packed copies) live in DIR/work/ and are removed once measured.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import SparselmError
from ..facts import CONFIG_JSON, SPARSITY_JSON
from ..sources import EMBEDDED, model_slug
from .config import CellKind, MethodSpec, ModelSpec, StudyConfig, cell_kind
from .store import Row, canonical

DENSE = "dense"
MODELS_DIR = "models"
WORK_DIR = "work"
ANALYSIS_DIR = "analysis"
PACKAGES = ("sparselm", "torch", "transformers", "safetensors", "accelerate", "numpy", "ray")


@dataclass(frozen=True)
class Cell:
    """One unit of work; its key (without the config hash, which the store adds) identifies its result."""

    model: str
    method: str
    options: str  # canonical JSON of the method's options ("{}" for the dense model)
    sparsity: float
    task: str  # analyze | prune | a task name (ptb, wiki-pair, ...) | pack | bench

    @property
    def key(self) -> tuple[str, str, str, float, str]:
        return (self.model, self.method, self.options, self.sparsity, self.task)

    @property
    def kind(self) -> CellKind:
        return cell_kind(self.task)

    @property
    def prune_cell(self) -> Cell | None:
        """The cell that makes this cell's model (None for the dense model and for the prune cell itself)."""
        if self.method == DENSE or self.kind == CellKind.PRUNE:
            return None
        return Cell(self.model, self.method, self.options, self.sparsity, CellKind.PRUNE.value)

    @property
    def label(self) -> str:
        what = "dense" if self.method == DENSE else f"{method_spec(self).label} s={self.sparsity:g}"
        return f"{model_slug(self.model)} {what} {self.task}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def scratch_name(self) -> str:
        return hashlib.sha256(canonical(self.to_json()).encode()).hexdigest()[:16]


def plan(config: StudyConfig) -> list[Cell]:
    """Every cell of the study, each after the prune cell it depends on."""
    cells: list[Cell] = []
    for spec in config.models:
        if config.analyze:
            cells.append(Cell(spec.name, DENSE, "{}", 0.0, CellKind.ANALYZE.value))
        if 0.0 in config.sparsities:
            cells += [Cell(spec.name, DENSE, "{}", 0.0, task) for task in _measures(spec, config, 0.0)]
        for method in config.methods:
            options = canonical(method.options())
            sparsities = method_sparsities(method, config)
            for sparsity in sparsities:
                cells.append(Cell(spec.name, method.method, options, sparsity, CellKind.PRUNE.value))
                cells += [Cell(spec.name, method.method, options, sparsity, task) for task in _measures(spec, config, sparsity)]
    return cells


def method_sparsities(method: MethodSpec, config: StudyConfig) -> list[float]:
    """The sparsities a method is pruned to: the one its N:M pattern fixes, its own list, or all of the study's."""
    if method.fixed_sparsity:
        return [method.fixed_sparsity]
    return method.sparsities or [s for s in config.sparsities if s > 0]


def _measures(spec: ModelSpec, config: StudyConfig, sparsity: float) -> list[str]:
    """The measuring cells of one model at one sparsity: its tasks, its packed size, its latency where timed."""
    pack = [CellKind.PACK.value] if config.size.enabled else []
    bench = [CellKind.BENCH.value] if config.runtime.times(sparsity) else []
    return [*spec.tasks, *pack, *bench]


def method_spec(cell: Cell) -> MethodSpec:
    return MethodSpec(method=cell.method, **json.loads(cell.options))


def model_dir(out: Path, cell: Cell) -> Path:
    """Where the pruned model of this cell lives in the shared directory."""
    return Path(out) / MODELS_DIR / model_slug(cell.model) / f"{method_spec(cell).slug}-s{cell.sparsity:g}"


def model_ref(out: Path, cell: Cell) -> str:
    """What the measuring APIs are given: the original model for dense cells, else the pruned directory."""
    return cell.model if cell.method == DENSE else str(model_dir(out, cell))


def is_complete_model_dir(path: Path) -> bool:
    """A pruned directory appears by one rename once fully written, so its presence with both files means complete."""
    return (path / CONFIG_JSON).is_file() and (path / SPARSITY_JSON).is_file()


def run_cell(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    """Do one cell and return {metrics, settings}; raises on failure (the executor records the error)."""
    return RUNNERS[cell.kind](cell, config, Path(out))


def execute(cell_json: dict[str, Any], config_json: dict[str, Any], out: str, executor: str) -> dict[str, Any]:
    """Run a cell and describe the outcome as a stored row (as JSON); never raises for a failing cell.

    This is the function a worker process or Ray task runs: everything in and out is plain JSON.
    """
    cell = Cell(**cell_json)
    config = StudyConfig.model_validate(config_json)
    started = time.time()
    t0 = time.perf_counter()
    try:
        result = run_cell(cell, config, Path(out))
        status, error = "ok", None
    except SparselmError as exc:
        result, status, error = {}, "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken cell must not stop the study; its row says what happened
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        result, status, error = {}, "failed", f"{type(exc).__name__}: {exc} (at {Path(tb.filename).name}:{tb.lineno})"
    return cell_row(cell, config, executor, status, result, error, started, time.perf_counter() - t0)


def cell_row(
    cell: Cell,
    config: StudyConfig,
    executor: str,
    status: str,
    result: dict[str, Any],
    error: str | None,
    started: float,
    seconds: float,
) -> dict[str, Any]:
    """A cell's outcome as a stored row (as JSON)."""
    return Row(
        model=cell.model,
        method=cell.method,
        options=json.loads(cell.options),
        sparsity=cell.sparsity,
        task=cell.task,
        kind=cell.kind.value,
        status=status,
        metrics=result.get("metrics", {}),
        settings=result.get("settings", {}),
        provenance=provenance(config, executor),
        error=error,
        started=started,
        seconds=seconds,
    ).to_json()


def failed_row(cell: Cell, config: StudyConfig, executor: str, reason: str) -> dict[str, Any]:
    """The row of a cell that did not run to its end: its prune cell failed, or its worker died."""
    return cell_row(cell, config, executor, "failed", {}, reason, time.time(), 0.0)


def provenance(config: StudyConfig, executor: str) -> dict[str, Any]:
    import torch

    return {
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "host": platform.node(),
        "seed": config.seed,
        "config_hash": config.hash,
        "executor": executor,
        "torch_threads": torch.get_num_threads(),
        **({"ray_resources": _ray_resources()} if executor == "ray" else {}),
    }


def _ray_resources() -> dict[str, float]:
    """What Ray granted the task running this cell (so the row shows the resources it really had)."""
    import ray

    return dict(ray.get_runtime_context().get_assigned_resources())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def estimated_memory_bytes(model: str) -> int | None:
    """A cell's memory need for Ray scheduling: a few copies of the fp32 weights plus working room."""
    if model in EMBEDDED:
        weights = EMBEDDED[model].parameters * 4
    else:
        files = list(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
        if not files:
            return None
        weights = sum(f.stat().st_size for f in files)
    return int(4 * weights + 512 * 2**20)


def scratch_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / WORK_DIR / cell.scratch_name


def clear_scratch(work: Path) -> None:
    """Remove a cell's scratch directory, and the shared scratch root once no other cell is using it."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()
    except OSError:
        pass  # another cell's scratch is still there (parallel workers)


# --- one runner per kind of cell ---------------------------------------------------------------------------------


def _analyze(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..analysis import measure_distribution, write_distribution
    from ..models import load_with_source

    model, source = load_with_source(cell.model)
    slug = model_slug(cell.model)
    dist = measure_distribution(model, slug, source.quantized_from)
    path = write_distribution(dist, out / ANALYSIS_DIR, slug)
    overall = dist.overall
    return {
        "metrics": {
            "weights": overall["count"],
            "matrices": len(dist.matrices),
            "zero_fraction": overall["zero_fraction"],
            "median_abs": overall["abs_quantiles"]["0.5"],
            "fraction_abs_le_2^-10": overall["fraction_abs_le_2pow_minus_k"]["10"],
            "quantized_from": dist.quantized_from,
            "dir": str(path.relative_to(out)),
        },
        "settings": {"include_embeddings": False},
    }


def prune_settings(cell: Cell, config: StudyConfig) -> Any:
    from ..pruning import PruneSettings

    spec = method_spec(cell)
    cal = config.calibration
    return PruneSettings(
        method=spec.method,
        sparsity=None if spec.fixed_sparsity else cell.sparsity,
        scope=spec.scope,
        pattern=spec.pattern,
        allocation=spec.allocation,
        calib=cal.source,
        calib_samples=cal.samples,
        calib_seqlen=cal.seqlen,
        seed=cal.seed,
        include_embeddings=spec.include_embeddings,
        **spec.recovery(),
    )


def _prune(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..pruning import prune_to_dir

    target = model_dir(out, cell)
    settings = prune_settings(cell, config)
    reused = is_complete_model_dir(target)
    if reused:
        report = json.loads((target / SPARSITY_JSON).read_text(encoding="utf-8"))
    else:
        report = prune_to_dir(cell.model, settings, target).to_json()
    metrics = _scalars(report)
    metrics.update({"dir": str(target.relative_to(out)), "reused_existing_dir": reused})
    return {"metrics": metrics, "settings": settings.model_dump(mode="json")}


def _perplexity(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..evaluation import evaluate

    ppl = config.perplexity
    settings = {"split": ppl.split, "seqlen": ppl.seqlen, "max_windows": ppl.max_windows, "batch_size": ppl.batch_size}
    metrics = evaluate(model_ref(out, cell), cell.task, **settings).to_json()
    return {"metrics": metrics, "settings": settings}


def _classification(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..evaluation import evaluate
    from ..finetune import finetune

    spec = next(m for m in config.models if m.name == cell.model)
    ft = config.finetune
    ft_settings = {
        "epochs": ft.epochs, "lr": ft.lr, "max_steps": config.finetune_steps(spec), "batch_size": ft.batch_size,
        "max_examples": ft.max_examples, "seed": config.seed,
    }
    cls = config.classification
    eval_settings = {"split": cls.split, "max_examples": cls.max_examples, "batch_size": cls.batch_size}
    work = scratch_dir(out, cell)
    shutil.rmtree(work, ignore_errors=True)
    try:
        tuned = finetune(model_ref(out, cell), cell.task, work / "finetuned", **ft_settings).to_json()
        metrics = evaluate(str(work / "finetuned"), cell.task, **eval_settings).to_json()
    finally:
        clear_scratch(work)
    return {"metrics": {**metrics, "finetune": _scalars(tuned)}, "settings": {"finetune": ft_settings, "eval": eval_settings}}


def _pack(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..sources import resolve
    from ..storage import pack

    source = resolve(cell.model).path if cell.method == DENSE else model_dir(out, cell)
    settings = {"format": config.size.format, "dtype": config.size.dtype}
    work = scratch_dir(out, cell)
    shutil.rmtree(work, ignore_errors=True)
    try:
        sizes = pack(source, work / "packed", **settings).to_json()
    finally:
        clear_scratch(work)
    sizes.pop("out")  # the scratch copy is gone; its sizes are what the study keeps
    return {"metrics": sizes, "settings": settings}


def _bench(cell: Cell, config: StudyConfig, out: Path) -> dict[str, Any]:
    from ..runtime import bench
    from ..runtime.bench import native_bf16

    rt = config.runtime
    settings = {"tokens": rt.tokens, "threads": rt.threads, "rounds": rt.rounds, "steps": rt.steps}
    # Dense bf16 is timed only where the CPU computes it natively: emulated, it is slower than fp32 and only costs
    # the study's time budget. Dense w8a8's perplexity check (tens of seconds a cell) is left to `sparselm bench`:
    # on the default models it fails the 2% gate, so the study could never show that baseline.
    result = bench(model_ref(out, cell), **settings, measure_size=False, bf16_baseline=native_bf16(),
                   w8a8_baseline=False).to_json()
    result.pop("per_layer")  # per-layer timings are bench's detail; the study keeps the totals and choices
    return {"metrics": result, "settings": settings}


def _scalars(report: dict[str, Any]) -> dict[str, Any]:
    """The top-level numbers and strings of a report (per-matrix detail stays in the model directory)."""
    return {k: v for k, v in report.items() if not isinstance(v, (list, dict))}


RUNNERS: dict[CellKind, Callable[[Cell, StudyConfig, Path], dict[str, Any]]] = {
    CellKind.ANALYZE: _analyze,
    CellKind.PRUNE: _prune,
    CellKind.PERPLEXITY: _perplexity,
    CellKind.CLASSIFICATION: _classification,
    CellKind.PACK: _pack,
    CellKind.BENCH: _bench,
}
