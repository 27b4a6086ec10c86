"""Pruning models bigger than memory: the model's skeleton on the meta device, its blocks read one at a time from the
safetensors shards, pruned and written to the output's shards, then freed.

The skeleton is built with `accelerate.init_empty_weights`; the tensors outside blocks (embeddings, final norms,
heads) are read once and stay. Everything else is the in-memory code path: `driver.prune` with a `ShardStream`,
whose `load`/`unload` the one calibration driver (`calibration.run_blocks`) calls around each block, so streamed
and in-memory pruning give bit-identical weights. Global magnitude ranks by a first pass over the shards (the exact
cut of `magnitude.global_cut`, matrix by matrix from disk), then applies the cut block by block. The calibration
hidden states stay in memory when they fit under the limit, else they go to an unnamed temporary file in the output's
temporary directory (`DiskBatches`) and are read back one batch at a time; a limit that not even one block and one
batch fit under is refused with the smallest limit that works.

The output is a Hugging Face directory with one shard per block (written as the block is freed), one for the rest,
and the index; `io.atomic_dir` makes it all-or-nothing.
"""

from __future__ import annotations

import ctypes
import platform
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..calibration import BlockRef, BlockStream, HeldBatches, windows_per_batch
from ..errors import SparselmError
from ..facts import SPARSITY_JSON, format_size
from ..io import atomic_dir, atomic_write_json
from ..masks import NM, Block, prune_count
from ..models import (
    INDEX, Checkpoint, empty_model, free_heap, has_generation_config, load_config, load_tokenizer, model_class,
    put_tensor, resident_bytes, tensor_bytes,
)
from ..progress import SILENT, Progress
from ..sources import ModelSource, resolve, write_provenance
from ..weights import Matrix, find_block_lists
from ..windows import WORKING_WINDOWS, available_memory, choose_seqlen, window_bytes
from .driver import prune
from .magnitude import _abs_into, apply_cut, global_cut, prune_global
from .report import PrunedModel
from .settings import PruneSettings

SETTLE_SLACK = 16 * 2**20  # freed pages a streamed run keeps before trimming them (`ShardStream.settle`)
WORK_BYTES = 32 * 10**6  # the interpreter's own growth while pruning: allocator slack, one batch's temporaries
MMAP_THRESHOLD = 1 << 20  # allocations this large get their own mapping, unmapped when freed
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@dataclass(frozen=True)
class MemoryPlan:
    """What a streamed run holds at once, in its three phases. Capturing a stack's inputs: the tensors outside blocks
    that a forward up to the last block reads whole (`inputs`: all but the output head and the input embedding, whose
    rows are read per call), one block and the hidden states.
    Working on a block: the block, two temporaries the size of its largest matrix (scores and mask while pruning),
    the method's per-block statistics and the hidden states. After the last block: the tensors outside blocks that
    are pruned too (`resident`, with --include-embeddings; the others are copied slice by slice) and two
    temporaries. Each phase also holds one batch's working set. The hidden states are all of
    them (`activations`) when held in memory, else one batch read back from disk and its output (`batch`). Writing a
    block to its shard copies nothing."""

    resident: int
    inputs: int
    block: int
    matrix: int
    activations: int
    statistics: int
    working: int = 0
    batch: int = 0
    disk_allowed: bool = False  # block reconstruction keeps its streams in memory

    def peak(self, hidden: int) -> int:
        """The largest phase when the hidden states take `hidden` bytes."""
        capture = self.inputs + self.block + hidden
        blocks = self.block + 2 * self.matrix + self.statistics + hidden
        after = self.resident + 2 * self.matrix
        return max(capture, blocks, after) + self.working + WORK_BYTES

    @property
    def in_memory(self) -> int:
        return self.peak(self.activations)

    @property
    def on_disk(self) -> int:
        return self.peak(2 * self.batch)

    @property
    def needed(self) -> int:
        """The smallest limit that works."""
        return min(self.in_memory, self.on_disk) if self.disk_allowed else self.in_memory

    def hidden_on_disk(self, limit: int) -> bool:
        """Whether the hidden states go to disk under `limit`; refuses a limit that one block and one batch (or, for
        reconstruction, every stream) do not fit under."""
        if limit >= self.in_memory:
            return False
        if self.disk_allowed and limit >= self.on_disk:
            return True
        held = "one batch of calibration activations" if self.disk_allowed else "calibration activations"
        activations = self.batch if self.disk_allowed else self.activations
        raise SparselmError(
            f"--max-memory {format_size(limit)} is below what pruning one block at a time needs: at least "
            f"{format_size(self.needed)} (one block {format_size(self.block)}, other weights while capturing "
            f"{format_size(self.inputs)}, {held} {format_size(activations)}); "
            f"use --max-memory {format_size(self.needed)} or more"
        )


class DiskBatches:
    """Hidden-state batches in an unnamed temporary file (nothing to clean up, even after a kill), read back one at a
    time; a batch is overwritten in place by the block's output, which has its shape."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)
        self._slots: list[tuple[int, torch.Size, torch.dtype]] = []
        self._end = 0
        self._device = device

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, shape, dtype = self._slots[index]
        tensor = torch.empty(shape, dtype=dtype)
        self._file.seek(offset)
        read = self._file.readinto(tensor_bytes(tensor))
        if read != tensor.numel() * tensor.element_size():
            raise SparselmError("the temporary file of calibration activations was cut short; is the disk full?")
        return tensor.to(self._device)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        offset, shape, dtype = self._slots[index]
        if value.shape != shape or value.dtype != dtype:
            raise AssertionError(f"batch {index} changes from {tuple(shape)} to {tuple(value.shape)}")
        self._write(offset, value)

    def append(self, value: torch.Tensor) -> None:
        self._slots.append((self._end, value.shape, value.dtype))
        self._end += value.numel() * value.element_size()
        self._write(self._slots[-1][0], value)

    def _write(self, offset: int, value: torch.Tensor) -> None:
        self._file.seek(offset)
        self._file.write(tensor_bytes(value.detach().to("cpu").contiguous()))


class ShardStream:
    """Loads a block's tensors from the checkpoint into the skeleton and, once pruned, writes them to the output
    shard of that block and puts the block back on the meta device. The tensors outside blocks (`resident`) are read
    when first needed and stay on the meta device while blocks are worked on: a capture has all but the output head
    and the input embedding (read row by row, per call), the work after the last block on them has all of them
    (`calibration.BlockStream`)."""

    def __init__(
        self, model: nn.Module, checkpoint: Checkpoint, out: Path | None, device: torch.device, resident: list[str],
        buffers: dict[int, dict[str, torch.Tensor]] | None = None, hidden_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.out = out
        self.device = device
        self.resident = resident
        self.loaded: set[str] = set()  # the resident tensors in memory now
        self.hidden_dir = hidden_dir  # where the hidden states go when they do not fit in memory
        self.shards = sum(len(s.blocks) for s in find_block_lists(model)) + 1
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        blocks = [b for s in find_block_lists(model) for b in s.blocks]
        self.buffers = buffers if buffers is not None else {id(b): _keep_buffers(b) for b in blocks}
        self.settling: dict[int, RemovableHandle] = {}  # per loaded block: its hook that settles after each call
        self.settled = 0  # resident bytes after the last trim

    def reading(self) -> BlockStream:
        reader = ShardStream(
            self.model, self.checkpoint, None, self.device, self.resident, self.buffers, self.hidden_dir
        )
        reader.loaded = self.loaded  # one model: one record of what is in memory
        return reader

    def held_batches(self) -> HeldBatches:
        return DiskBatches(self.hidden_dir, self.device) if self.hidden_dir is not None else []

    @contextmanager
    def capturing(self) -> Iterator[None]:
        head = _head_names(self.model)
        looked_up = _looked_up_names(self.model, self.resident)
        self._park([n for n in self.resident if n in head])
        self._put_outside([n for n in self.resident if n not in head and n not in looked_up])
        self._trim()
        with self._rows_per_call(looked_up[0] if looked_up else None):
            yield
        self._park(self.resident)

    @contextmanager
    def _rows_per_call(self, name: str | None) -> Iterator[None]:
        """Each embedding module on the input embedding's (meta) weight gets, for each call, just the rows its ids
        name, read from the shards (`Checkpoint.rows`), and the ids renumbered into them: a capture never holds the
        whole vocabulary (on a large model the biggest matrix, and in a bf16 checkpoint a float32 copy of it)."""
        if name is None:
            yield
            return
        weight = self.model.get_parameter(name)
        modules = [m for m in self.model.modules() if isinstance(m, nn.Embedding) and m.weight is weight]
        padding = {m: m.padding_idx for m in modules}

        def before(module: nn.Embedding, args: tuple) -> tuple:
            ids = args[0]
            wanted = ids.reshape(-1).cpu()
            if padding[module] is not None:  # F.embedding checks it against the table's size: renumber it too
                wanted = torch.cat([wanted, torch.tensor([padding[module]])])
            unique, inverse = torch.unique(wanted, return_inverse=True)
            module.weight = nn.Parameter(self.checkpoint.rows(name, unique.tolist(), self.device), requires_grad=False)
            if padding[module] is not None:
                module.padding_idx, inverse = int(inverse[-1]), inverse[:-1]
            return (inverse.reshape(ids.shape).to(ids.device), *args[1:])

        def after(module: nn.Embedding, _args: tuple, _output: torch.Tensor) -> None:
            module.weight, module.padding_idx = weight, padding[module]

        handles = [m.register_forward_pre_hook(before) for m in modules]
        handles += [m.register_forward_hook(after) for m in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def restore_outside(self) -> None:
        self._put_outside(self.resident)

    def _put_outside(self, names: list[str]) -> None:
        for name, tensor in self.checkpoint.read([n for n in names if n not in self.loaded], self.device).items():
            put_tensor(self.model, name, tensor)
            self.loaded.add(name)
        self.model.tie_weights()

    def _park(self, names: list[str]) -> None:
        """Put the named parameters outside blocks back on the meta device and free them (buffers stay: small)."""
        state = self.model.state_dict(keep_vars=True)
        for name in names:
            if name in self.loaded and isinstance(state[name], nn.Parameter):
                put_tensor(self.model, name, state[name].to("meta"))
                self.loaded.discard(name)
        del state
        self.model.tie_weights()
        self._trim()

    def load(self, ref: BlockRef) -> None:
        block = ref.module
        if not any(p.is_meta for p in block.parameters()):
            return
        names = list(block.state_dict())
        tensors = self.checkpoint.read([f"{ref.name}.{n}" for n in names], self.device)
        for n in names:
            put_tensor(block, n, tensors[f"{ref.name}.{n}"])
        for n, buffer in self.buffers.get(id(block), {}).items():
            put_tensor(block, n, buffer.to(self.device))
        self.settling[id(block)] = block.register_forward_hook(lambda *_: self.settle())

    def unload(self, ref: BlockRef) -> None:
        handle = self.settling.pop(id(ref.module), None)
        if handle is not None:
            handle.remove()
        if self.out is not None:
            state = {f"{ref.name}.{n}": t for n, t in ref.module.state_dict().items()}
            self._write(state, self._shard_number(ref))
        ref.module.to("meta")
        self._trim()

    def settle(self) -> None:
        """Hand the heap pages that the last steps' temporaries used back to the OS once they add up to SETTLE_SLACK.
        glibc serves even large allocations from free heap space when it has some, and keeps a freed chunk's pages
        until trimmed; each block call and each matrix pruned lands its temporaries on partly other pages than the
        last, so without settling a streamed run held ~100 MB more by the end of a block than at its start
        (smollm2-135m, Wanda, 32 × 512 tokens). Trimming after every step instead costs the page faults of
        touching those pages again (~10 ms a call, a fifth of the run)."""
        now = resident_bytes()
        if now is None or now > self.settled + SETTLE_SLACK:
            self._trim()

    def _trim(self) -> None:
        """Trim the heap and note the resident set it leaves, the level `settle` measures growth from."""
        free_heap()
        self.settled = resident_bytes() or 0

    def _shard_number(self, ref: BlockRef) -> int:
        number = 1
        for stack in find_block_lists(self.model):
            if stack.path == ref.stack.path:
                return number + ref.index
            number += len(stack.blocks)
        raise AssertionError(ref.name)

    def _write(self, state: dict[str, torch.Tensor], number: int) -> None:
        from safetensors.torch import save_file

        assert self.out is not None
        file = f"model-{number:05d}-of-{self.shards:05d}.safetensors"
        kept = {n: t.detach().to("cpu").contiguous() for n, t in state.items() if n in self.checkpoint.files}
        save_file(kept, self.out / file, metadata={"format": "pt"})
        self.weight_map.update({n: file for n in kept})
        self.total_bytes += sum(t.numel() * t.element_size() for t in kept.values())

    def finish(self) -> None:
        """Write the tensors outside blocks to the last shard (those still on the meta device, which nothing changed,
        copied from the checkpoint slice by slice), then the index."""
        assert self.out is not None
        file = f"model-{self.shards:05d}-of-{self.shards:05d}.safetensors"
        state = self.model.state_dict()
        held = {n: state[n] for n in self.resident if n in self.loaded}
        del state
        self.total_bytes += self.checkpoint.write(self.out / file, self.resident, held)
        self.weight_map.update({n: file for n in self.resident})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        atomic_write_json(self.out / INDEX, index)  # type: ignore[operator]

    def prune_together(self, matrices: list[Matrix], settings: PruneSettings, each_block: Callable[..., None]) -> None:
        """Global magnitude: the exact cut over every matrix read from the shards, then applied block by block."""
        pattern = settings.parsed_pattern
        groups: dict[str | None, list[int]] = {}
        for i, m in enumerate(matrices):
            groups.setdefault(m.block_name, []).append(i)
        if isinstance(pattern, NM):  # a per-group rule: nothing to rank across matrices
            def by_group(ref: BlockRef) -> None:
                weights = [matrices[i].weight() for i in groups.get(ref.name, [])]
                prune_global(weights, settings.target_sparsity, pattern)

            each_block(by_group)
            if None in groups:
                self.restore_outside()
            prune_global([matrices[i].weight() for i in groups.get(None, [])], settings.target_sparsity, pattern)
            return
        if isinstance(pattern, Block):
            raise SparselmError("--scope global with block patterns needs the whole model in memory; drop --max-memory")
        largest = max(m.numel for m in matrices)
        buffer, keep_buffer = torch.empty(largest), torch.empty(largest, dtype=torch.bool)
        total = sum(m.numel for m in matrices)
        cut = global_cut(
            lambda: (_abs_into(buffer[: m.numel], self._weight(m)) for m in matrices),
            total, prune_count(total, settings.target_sparsity),
            lambda stride: (self._weight(m).reshape(-1)[::stride].abs() for m in matrices),
        )
        plan = list(zip(cut.equal_per_source, cut.prune_plan()))

        def apply(indices: list[int]) -> None:
            for i in indices:
                apply_cut(matrices[i].weight(), cut.threshold, *plan[i], buffer, keep_buffer)

        each_block(lambda ref: apply(groups.get(ref.name, [])))
        if None in groups:
            self.restore_outside()
        apply(groups.get(None, []))

    def _weight(self, m: Matrix) -> torch.Tensor:
        """A matrix as out × in: from the model when resident, else read from the shards."""
        if not m.parameter.is_meta:
            return m.weight()
        w = self.checkpoint.read([m.name], torch.device("cpu"))[m.name]
        return w.t() if m.transposed else w


def _looked_up_names(model: nn.Module, resident: list[str]) -> list[str]:
    """The checkpoint names of the input embedding's weight (tied copies included), when it is a plain lookup table
    (`nn.Embedding`) that a capture can read row by row; else none."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:  # max_norm rewrites rows it reads
        return []
    state = model.state_dict(keep_vars=True)
    return [n for n in resident if state[n] is embedding.weight]


def _head_names(model: nn.Module) -> set[str]:
    """The tensor names of the model's output head (a capture stops at the last block and never reads it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{n}" for n in head.state_dict()}


def _keep_buffers(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's buffers that no checkpoint holds (built by the skeleton, e.g. rotary tables), kept while it is
    unloaded; the block itself goes to the meta device."""
    persistent = set(block.state_dict())
    kept = {n: b for n, b in block.named_buffers() if n not in persistent}
    block.to("meta")
    return kept


def map_large_allocations() -> None:
    """Make glibc serve every allocation of `MMAP_THRESHOLD` bytes or more with its own mapping, handed back to the OS
    when freed. By default glibc raises that threshold after the first large free, so a block's activations then come
    from the heap, whose freed space the OS does not get back: a streamed run peaked ~200 MB above what it held
    (smollm2-135m). Process-wide and lasting (it also ends glibc's moving threshold); a no-op without glibc."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        except (OSError, AttributeError):
            pass


def memory_plan(model: nn.Module, checkpoint: Checkpoint, settings: PruneSettings, resident: list[str]) -> MemoryPlan:
    """The bytes a streamed run of `settings` holds at once (the smallest --max-memory that works)."""
    blocks = [(s.path, i, b) for s in find_block_lists(model) for i, b in enumerate(s.blocks)]
    names = [f"{p}.{i}.{n}" for p, i, b in blocks for n in b.state_dict()]
    block = max(checkpoint.float_bytes([f"{p}.{i}.{n}" for n in b.state_dict()]) for p, i, b in blocks)
    matrix = max(checkpoint.float_bytes([n]) for n in names if len(checkpoint.shapes[n]) == 2)
    activations = statistics = working = batch = 0
    if settings.needs_calibration:
        seqlen = choose_seqlen(model, settings.calib_samples, settings.calib_seqlen, lambda _m: None)
        window = window_bytes(model, seqlen)
        streams = 3 if settings.reconstruct else 1  # reconstruction also holds the dense stream and its targets
        activations = streams * settings.calib_samples * window
        tokens = settings.reconstruct_settings.batch_tokens if settings.reconstruct else None
        batch = min(settings.calib_samples, windows_per_batch(seqlen, tokens)) * window
        working = WORKING_WINDOWS * window
    if settings.method in ("sparsegpt", "admm"):  # a Hessian per matrix of the block (float32, inverted in float64)
        _, _, first = blocks[0]
        statistics = sum(12 * m.in_features ** 2 for m in first.modules() if isinstance(m, nn.Linear))
        statistics += sum(12 * m.weight.shape[0] ** 2 for m in first.modules() if type(m).__name__ == "Conv1D")
    unread = _head_names(model) | set(_looked_up_names(model, resident))  # a capture reads neither whole
    return MemoryPlan(
        checkpoint.float_bytes(resident) if settings.include_embeddings else 0,
        checkpoint.float_bytes([n for n in resident if n not in unread]) if settings.needs_calibration else 0, block,
        matrix, activations, statistics, working, batch, disk_allowed=not settings.reconstruct,
    )


def weights_bytes(path: Path, shown: str) -> int:
    """The float32 bytes of a plain directory's weights (what loading it in memory takes)."""
    checkpoint = Checkpoint.open(path, shown)
    return checkpoint.float_bytes(list(checkpoint.files))


def needs_streaming(model_name_or_path: str) -> tuple[int, int] | None:
    """(weights, available) bytes when a plain safetensors model would not fit in the available memory, else None."""
    path = resolve(model_name_or_path).path
    if not Checkpoint.present(path):
        return None
    weights, available = weights_bytes(path, model_name_or_path), available_memory()
    return (weights, available) if weights > available else None


def prune_streamed(
    model_name_or_path: str,
    settings: PruneSettings,
    out_dir: Path,
    max_memory: int,
    progress: Progress = SILENT,
    force: bool = False,
    device: torch.device | None = None,
    notes: tuple[str, ...] = (),
) -> PrunedModel:
    """`save.prune_to_dir` one block at a time under `max_memory` bytes: refused before any work (nothing written)
    when the limit is below what one block needs."""
    device = device or torch.device("cpu")
    source: ModelSource = resolve(model_name_or_path)
    checkpoint = Checkpoint.open(source.path, model_name_or_path)
    config = load_config(source.path, model_name_or_path)
    model = empty_model(model_class("auto", config), config)
    resident = _resident_names(model, checkpoint, model_name_or_path)
    on_disk = memory_plan(model, checkpoint, settings, resident).hidden_on_disk(max_memory)
    map_large_allocations()
    with atomic_dir(Path(out_dir), force) as tmp:
        stream = ShardStream(model, checkpoint, tmp, device, resident, hidden_dir=tmp if on_disk else None)
        for message in notes:
            progress.note(message)
        report = prune(model, settings, _saved_tokenizer(source.path, tmp), progress, stream=stream)
        report.notes[:0] = list(notes)
        stream.finish()
        model.config.save_pretrained(tmp)
        if model.can_generate() and has_generation_config(source.path):
            model.generation_config.save_pretrained(tmp)
        result = PrunedModel(model_name_or_path, Path(out_dir), report)
        atomic_write_json(tmp / SPARSITY_JSON, result.to_json())
        write_provenance(tmp, source, pruned={"method": settings.method, "sparsity": report.target_sparsity})
    return result


def _saved_tokenizer(source: Path, out: Path) -> Any:
    """The model's tokenizer (None without one), already saved into the output: the caller hands it to the driver
    without keeping it, so that it is freed once the calibration text is tokenised (~45 MB for smollm2's)."""
    tokenizer = load_tokenizer(source, required=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return tokenizer


def _resident_names(model: nn.Module, checkpoint: Checkpoint, shown: str) -> list[str]:
    """Checkpoint tensors outside blocks; refuses a checkpoint whose names are not the model's own."""
    state = model.state_dict()
    unknown = [n for n in checkpoint.files if n not in state]
    if unknown:
        raise SparselmError(
            f"'{shown}' names its tensors differently from the model ('{unknown[0]}'); "
            "it cannot be pruned block by block, drop --max-memory"
        )
    prefixes = tuple(f"{s.path}." for s in find_block_lists(model))
    missing = [n for n in state if n.startswith(prefixes) and n not in checkpoint.files]
    if missing:
        raise SparselmError(f"'{shown}' lacks the block tensor '{missing[0]}'; copy the model again")
    return [n for n in checkpoint.files if not n.startswith(prefixes)]
