"""One entry point for every method: pick the matrices, calibrate when needed, prune, recover, and report.

What each method does to one matrix is its registered `Pruner`'s business (`registry.py`); this module decides the
order: the calibration windows (`sparselm.windows`), OWL's per-block targets (`owl.py`), then the matrices — all
together (`--scope global`), one by one, or block by block through the calibration driver for methods that score
with calibration inputs and whenever blocks are reconstructed.

Block by block, each block is pruned in `steps` rounds (1 = one shot) before the next block is fed. Round k of K
takes every matrix of the block to s_k = s·(1 − (1 − k/K)³) of its own target s (Zhu & Gupta's cubic schedule,
`recovery.cubic_schedule`; under N:M, N:M with N = round(M·(1 − s_k)), as OWL moves N), then recovers:
- with `reconstruct`, the block's kept weights are trained, masks fixed (pruned entries stay exactly zero), towards
  the dense block's outputs on the dense model's inputs, from the pruned model's inputs (`recovery.reconstruct`);
- without, the next round's re-pruning is the recovery: SparseGPT and ADMM re-solve the kept weights, starting from
  the weights the previous round left (methods that do not update weights need `reconstruct` for `steps` > 1).
Every round first collects the method's statistics by running the block on its calibration batches — a block
forward, no extra model passes — so round k scores the block as round k − 1 left it; round 1 equals one-shot
pruning. Each round's mask is chosen afresh by the method: under magnitude and Wanda earlier zeros stay pruned (a
zero scores lowest); SparseGPT's and ADMM's updates may give a weight pruned in an earlier round a value again.
The last round hits the target exactly, as one-shot pruning does.

With a `StreamedBlocks` (`stream.py`: a model whose blocks stay on disk until used) the same paths run with each
block loaded before and unloaded after its turn, and each matrix's report row taken before its block is freed.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..calibration import (
    Batches, BlockRef, BlockStream, Collector, EarlyStop, collect_inputs, module_hooks, run_blocks, total_blocks,
)
from ..errors import SparselmError
from ..masks import apply_keep, check_shape
from ..recovery import cubic_schedule, reconstruct_block
from ..weights import Matrix, by_block, find_block_lists, select_matrices, sparsity_of
from ..windows import CALIBRATION_SPLIT, calibration_windows
from .magnitude import prune_by_magnitude
from .owl import OwlAllocation, block_pattern, owl_allocation
from ..progress import SILENT, Progress
from .report import RECONSTRUCTION_LOSS, PruneReport, matrix_row
from .settings import PruneSettings, settings_from

Note = Callable[[str], None]
Rounds = dict[str, list[dict[str, Any]]]  # per block: one entry per round (sparsity, losses when reconstructing)
Rows = dict[str, dict[str, Any]]  # the report row of each matrix, by name


class StreamedBlocks(BlockStream, Protocol):
    """A model streamed from disk block by block: the driver's per-block load/unload, a read-only view of it (for
    OWL's pass over the dense model), and the global magnitude cut, which needs every block's weights."""

    def reading(self) -> BlockStream: ...

    def prune_together(self, matrices: list[Matrix], settings: PruneSettings, each_block: Callable[..., None]) -> None:
        ...


def prune(
    model: nn.Module,
    settings: PruneSettings | None = None,
    tokenizer: Any = None,
    progress: Progress = SILENT,
    windows: torch.Tensor | None = None,
    owl: OwlAllocation | None = None,
    stream: StreamedBlocks | None = None,
    **fields: Any,
) -> PruneReport:
    """Prune `model` in place. Pass a PruneSettings or its fields (`method=`, `sparsity=`, …).

    `windows` (samples × seqlen token ids) replaces the calibration text when given. `owl` reuses an allocation
    from `owl_allocation` on the same dense model (it depends only on the dense model, the windows, the target
    sparsity and the OWL parameters), so several methods can share one calibration pass for it.
    """
    settings = settings if settings is not None else settings_from(**fields)
    started = time.perf_counter()
    matrices = select_matrices(model, settings.include_embeddings)
    for m in matrices:
        check_shape(settings.parsed_pattern, m.shape, m.name)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress.note(message)

    calibration = None
    if settings.needs_calibration:
        windows, calibration = _windows(model, settings, tokenizer, windows, note, progress)
    del tokenizer  # tokenised: a caller that kept no reference (a streamed run) gets its memory back
    calibrated_at = time.perf_counter()
    allocation = None
    if settings.allocation == "owl":
        reader = stream.reading() if stream is not None else None
        allocation = owl or owl_allocation(model, settings, windows, progress, reader)
    targets = {
        m.name: allocation.target(m.block_name, settings.target_sparsity) if allocation else settings.target_sparsity
        for m in matrices
    }
    rows: Rows = {}
    groups = by_block(matrices)

    def record(ref: BlockRef) -> None:  # a streamed block's rows are taken before it is unloaded
        if stream is not None:
            mats = groups.get(ref.name, [])
            rows.update({m.name: matrix_row(m, targets[m.name], settings.parsed_pattern) for m in mats})

    rounds: Rounds | None = None
    if settings.scope == "global" and settings.reconstruct:
        if stream is not None:
            raise SparselmError("--scope global with --reconstruct needs the whole model in memory; drop --max-memory")
        keep = _global_keep(matrices, settings)
        rounds = _prune_block_by_block(model, matrices, settings, targets, windows, note, progress, keep)
    elif settings.scope == "global":
        progress.start(f"global {settings.method}", 1)
        if stream is not None:
            stream.prune_together(matrices, settings, lambda visit: _each_block(model, stream, visit, record))
        else:
            settings.pruner.prune_together(matrices, settings.target_sparsity, settings.parsed_pattern)
        progress.advance()
    elif settings.pruner.needs_calibration or settings.reconstruct:
        rounds = _prune_block_by_block(
            model, matrices, settings, targets, windows, note, progress, stream=stream, record=record
        )
    else:
        _prune_each(matrices, settings, targets, progress, model, stream, record)
    return PruneReport(
        settings=settings,
        target_sparsity=settings.target_sparsity,
        matrices=[rows.get(m.name) or matrix_row(m, targets[m.name], settings.parsed_pattern) for m in matrices],
        calibration=calibration,
        block_sparsity=allocation.block_sparsity if allocation else None,
        outlier_ratio=allocation.outlier_ratio if allocation else None,
        seconds=time.perf_counter() - started,
        calibration_seconds=calibrated_at - started if calibration else 0.0,
        notes=notes,
        recovery=_recovery_record(settings, rounds),
    )


def _windows(
    model: nn.Module, settings: PruneSettings, tokenizer: Any, windows: torch.Tensor | None, note: Note,
    progress: Progress,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The given windows, or windows of the calibration text (which needs the model's tokenizer)."""
    if windows is not None:
        return windows, {"source": "given token windows", "samples": windows.shape[0], "seqlen": windows.shape[1]}
    if tokenizer is None:
        fix = "use --method magnitude" if settings.pruner.needs_calibration else f"drop {settings.calibration_user}"
        raise SparselmError(
            f"{settings.calibration_user} needs calibration text but the model has no tokenizer; "
            f"save the tokenizer next to the model (tokenizer.save_pretrained) or {fix}"
        )
    progress.start(f"tokenising {settings.calib} ({CALIBRATION_SPLIT})", 1)
    found = calibration_windows(
        model, tokenizer, settings.calib, settings.calib_samples, settings.calib_seqlen, settings.seed, note
    )
    progress.advance()
    return found


def _prune_one(m: Matrix, settings: PruneSettings, sparsity: float, stats: Any = None) -> None:
    settings.pruner.prune_matrix(m, stats, block_pattern(settings.parsed_pattern, sparsity), sparsity, settings)


def _prune_each(
    matrices: list[Matrix], settings: PruneSettings, targets: dict[str, float], progress: Progress,
    model: nn.Module, stream: BlockStream | None = None, record: Callable[[BlockRef], None] = lambda _ref: None,
) -> None:
    progress.start(f"{settings.method} per matrix", len(matrices))

    def prune_all(mats: list[Matrix]) -> None:
        for m in mats:
            _prune_one(m, settings, targets[m.name])
            progress.advance()

    if stream is None:
        prune_all(matrices)
        return
    groups = by_block(matrices)
    _each_block(model, stream, lambda ref: prune_all(groups.get(ref.name, [])), record)
    outside = [m for m in matrices if m.block_name is None]
    if outside:
        stream.restore_outside()
    prune_all(outside)


def _each_block(
    model: nn.Module, stream: BlockStream, visit: Callable[[BlockRef], None], record: Callable[[BlockRef], None]
) -> None:
    """Visit every block of a streamed model without calibration: load, visit, record its rows, unload."""
    for stack in find_block_lists(model):
        for index, block in enumerate(stack.blocks):
            ref = BlockRef(stack, index, block)
            stream.load(ref)
            visit(ref)
            record(ref)
            stream.unload(ref)


def _prune_by_magnitude(m: Matrix, settings: PruneSettings, sparsity: float) -> None:
    prune_by_magnitude(m.weight(), block_pattern(settings.parsed_pattern, sparsity), sparsity)


def _prune_block_by_block(
    model: nn.Module,
    matrices: list[Matrix],
    settings: PruneSettings,
    targets: dict[str, float],
    windows: torch.Tensor,
    note: Note,
    progress: Progress,
    fixed: dict[str, torch.Tensor] | None = None,
    stream: BlockStream | None = None,
    record: Callable[[BlockRef], None] = lambda _ref: None,
) -> Rounds:
    """Prune (and recover) block by block in `settings.steps` rounds (module docstring); matrices outside blocks
    (embeddings, heads) fall back to magnitude. `fixed` holds keep-masks chosen beforehand (a global ranking), which
    are applied instead of the method's. Returns each block's rounds."""
    groups = by_block(matrices)
    method = settings.pruner
    scores = method.needs_calibration and fixed is None
    schedules = {m.name: _round_targets(targets[m.name], settings.steps) for m in matrices}
    rounds: Rounds = {}
    recorded = settings.steps > 1 or settings.reconstruct  # one-shot rounds go nowhere (`_recovery_record`)
    unseen: set[str] = set()

    def prune_round(mats: list[Matrix], k: int, stats: dict[str, Any] | None) -> None:
        for m in mats:
            sparsity = schedules[m.name][k]
            if fixed is not None:
                apply_keep(m.weight(), fixed[m.name])
            elif stats is not None and stats[m.name].tokens == 0:
                if m.name not in unseen:
                    unseen.add(m.name)
                    note(f"{m.name} saw no calibration input; pruned by magnitude instead")
                _prune_by_magnitude(m, settings, sparsity)
            else:
                _prune_one(m, settings, sparsity, stats[m.name] if stats is not None else None)
            if stream is not None:
                stream.settle()

    def prune_in_rounds(
        ref: BlockRef, run: Callable[[], object], batches: Batches | None
    ) -> list[torch.Tensor] | None:
        """Prune the block's matrices in rounds; with `batches`, reconstruct after each round and return the block's
        outputs on them after the last."""
        mats = groups.get(ref.name, [])
        if not mats:
            return None
        entries, outputs = [], None
        for k in range(settings.steps):
            stop_in = ref.module if batches is None else None  # reconstruction's `run` needs the block's outputs
            prune_round(mats, k, collect_shared_inputs(mats, method.collector, run, stop_in) if scores else None)
            entry = {"round": k + 1, "sparsity": sparsity_of(mats)} if recorded else {}
            if batches is not None:
                result = reconstruct_block(
                    ref.module, batches.inputs, batches.calls, batches.targets, _keep_masks(mats),
                    settings.reconstruct_settings,
                )
                entry.update(loss_before=result.before, loss_after=result.after, trained_weights_kept=result.kept)
                outputs = result.outputs
            entries.append(entry)
        rounds[ref.name] = entries
        return outputs

    def visit(ref: BlockRef, run: Callable[[], object]) -> None:
        if not settings.reconstruct:
            prune_in_rounds(ref, run, None)

    def recover(ref: BlockRef, batches: Batches) -> list[torch.Tensor] | None:  # needs the dense targets: prune here
        return prune_in_rounds(ref, lambda: batches.outputs(ref.module), batches)

    stage = f"{settings.method} block by block" + (" + reconstruction" if settings.reconstruct else "")
    progress.start(stage, total_blocks(model))
    def done(ref: BlockRef) -> None:
        record(ref)
        progress.advance()

    run_blocks(
        model, windows, visit, done, recover=recover if settings.reconstruct else None,
        batch_tokens=settings.reconstruct_settings.batch_tokens if settings.reconstruct else None, stream=stream,
    )
    outside = [m for m in matrices if m.block_name is None]
    if outside and stream is not None:
        stream.restore_outside()
    for m in outside:
        if fixed is not None:
            apply_keep(m.weight(), fixed[m.name])
        else:
            _prune_by_magnitude(m, settings, targets[m.name])
    return rounds


def _round_targets(target: float, steps: int) -> list[float]:
    """A matrix's sparsity after each round: the cubic schedule from 0 to its target (a target of 0 stays 0)."""
    return cubic_schedule(target, steps) if target > 0 else [0.0] * steps


def _keep_masks(mats: list[Matrix]) -> dict[nn.Parameter, torch.Tensor]:
    """Each matrix's keep-mask as pruned now, in the parameter's own orientation (a Conv1D weight's is in × out)."""
    return {m.parameter: m.parameter.detach() != 0 for m in mats}


def _global_keep(matrices: list[Matrix], settings: PruneSettings) -> dict[str, torch.Tensor]:
    """The keep-masks (out × in) of the global ranking, with the weights left dense: block reconstruction needs each
    block's dense outputs before the block is pruned. Holds one copy of the matrices while ranking."""
    dense = [m.weight().clone() for m in matrices]
    settings.pruner.prune_together(matrices, settings.target_sparsity, settings.parsed_pattern)
    keep = {m.name: m.weight() != 0 for m in matrices}
    for m, weight in zip(matrices, dense):
        m.weight().copy_(weight)
    return keep


class _SharedInputs:
    """Forward hooks that give matrices called on the very same input tensor (q/k/v, gate/up) one collector.

    A matrix's first call decides: if the tensor it gets is the one the previous call fed to a collector (same
    object, unchanged since), it joins that collector; otherwise it starts its own. On every later call a joined
    matrix only checks that it again reads what its collector was just fed; `consistent` turns False otherwise, or if
    the matrices of a collector were called a different number of times."""

    def __init__(self, make: Callable[[int], Collector], stop: EarlyStop) -> None:
        self._make = make
        self._stop = stop
        self.collectors: dict[str, Collector] = {}
        self._leader: dict[str, bool] = {}
        self._calls: dict[str, int] = {}
        # id(collector) → (tensor last added, its version); weak references, so that no call's inputs outlive it
        self._fed: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._latest: tuple[weakref.ref[torch.Tensor], int, Collector] | None = None
        self.consistent = True

    def hook(self, name: str, in_features: int) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
            x = args[0]
            self._calls[name] = self._calls.get(name, 0) + 1
            if name not in self.collectors:
                latest = self._latest
                joins = latest is not None and latest[0]() is x and latest[1] == x._version
                self.collectors[name] = latest[2] if joins else self._make(in_features)
                self._leader[name] = not joins
            collector = self.collectors[name]
            if self._leader[name]:
                collector.add(x)
                self._fed[id(collector)] = (weakref.ref(x), x._version)
                self._latest = (weakref.ref(x), x._version, collector)
            else:
                fed = self._fed.get(id(collector))
                self.consistent &= fed is not None and fed[0]() is x and fed[1] == x._version
            self._stop.called(name)

        return record

    def groups_called_alike(self) -> bool:
        """Every matrix sharing a collector was called as often as the one that feeds it."""
        feeds = {id(self.collectors[n]): self._calls[n] for n, lead in self._leader.items() if lead}
        return all(self._calls[n] == feeds[id(self.collectors[n])] for n in self._leader)


def collect_shared_inputs(
    matrices: list[Matrix], make: Callable[[int], Collector], run: Callable[[], object], block: nn.Module | None = None
) -> dict[str, Collector]:
    """`calibration.collect_inputs`, with one collector per distinct input instead of one per matrix: matrices that
    read the same inputs share their statistic (and SparseGPT, through it, one inverse factor), which is what pruning
    each with its own copy would compute. Should the block break that sharing on a later batch (the first batch
    decides it), the statistics are collected again, one collector per matrix. With the `block` that `run` calls,
    each call ends once every matrix had its input (`calibration.EarlyStop`)."""
    stop = EarlyStop((m.name for m in matrices), block)
    shared = _SharedInputs(make, stop)
    with module_hooks({m.module: shared.hook(m.name, m.shape[1]) for m in matrices}, pre=True), stop.watching():
        run()
    if not (shared.consistent and shared.groups_called_alike()):
        return collect_inputs(matrices, make, run, block)
    return {m.name: shared.collectors.get(m.name) or make(m.shape[1]) for m in matrices}  # uncalled: no tokens


def _recovery_record(settings: PruneSettings, rounds: Rounds | None) -> dict[str, Any] | None:
    """What the rounds and the reconstruction did per block (None for one-shot pruning without reconstruction)."""
    if rounds is None or (settings.steps == 1 and not settings.reconstruct):
        return None
    record: dict[str, Any] = {"steps": settings.steps, "reconstruct": settings.reconstruct, "blocks": rounds}
    if settings.reconstruct:
        record["loss"] = RECONSTRUCTION_LOSS
    return record
