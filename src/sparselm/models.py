"""Loading models into memory as normal transformers models: plain directories, packed directories (decoded in
place by `storage`), embedded aliases and hub ids (found by `sources`), and their tokenizers."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import SparselmError
from .facts import has_tokenizer
from .sources import ModelSource, read_provenance, resolve
from .storage import MANIFEST, is_packed, model_from_packed, packed_config, read_manifest
from .storage.loading import GENERATION_CONFIG, heap_trimmer, place

Head = Literal["auto", "base", "causal-lm", "masked-lm", "seq2seq-lm", "sequence-classification"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings for a step whose expected oddities sparselm already handles and reports
    (a classifier head initialised on purpose, a token stream longer than the model's context)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def model_class(head: Head, config: Any) -> Any:
    import transformers

    classes = {
        "base": transformers.AutoModel,
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }
    if head != "auto":
        return classes[head]
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load(
    name_or_path: str,
    head: Head = "auto",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """Load a model by alias, local directory (plain or packed by sparselm) or hub id as a normal transformers model."""
    return load_with_source(name_or_path, head, dtype, trust_remote_code, **model_kwargs)[0]


def load_with_source(
    name_or_path: str,
    head: Head = "auto",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **model_kwargs: Any,
) -> tuple[torch.nn.Module, ModelSource]:
    from safetensors import SafetensorError

    source = resolve(name_or_path)
    path = source.path
    manifest = read_manifest(path) if is_packed(path) else None
    if manifest is None and "packed" in read_provenance(path):
        raise SparselmError(f"'{name_or_path}' is a packed directory whose {MANIFEST} is missing; copy the whole "
                            "packed directory again")
    config = packed_config(path, manifest) if manifest else load_config(path, name_or_path, trust_remote_code)
    for key, value in model_kwargs.pop("config_overrides", {}).items():
        setattr(config, key, value)
    cls = model_class(head, config)
    try:
        if manifest:
            model = model_from_packed(path, manifest, cls, config, dtype, **model_kwargs)
        else:
            model = cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **model_kwargs)
    except ValueError as exc:
        raise SparselmError(f"'{name_or_path}' cannot be loaded with a {head} head: {_first_line(exc)}") from exc
    except (OSError, SafetensorError) as exc:
        raise SparselmError(_weights_error(name_or_path, exc)) from exc
    model.eval()
    return model, source


def empty_model(cls: Any, config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An instance of `cls` (a model class or Auto class) whose parameters are on the meta device (no memory);
    buffers the model builds itself (rotary tables) are real. In eval mode, as `load` returns models."""
    from accelerate import init_empty_weights

    build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=dtype)
    return model.eval()


def load_config(path: Path, name: str, trust_remote_code: bool = False) -> Any:
    """The transformers config in `path`, or one clear line naming `name` when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SparselmError(f"cannot read the config of '{name}': {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _weights_error(name: str, exc: BaseException) -> str:
    return (
        f"cannot load the weights of '{name}' ({_first_line(exc)}); the weight files are missing or corrupt, "
        "copy them again"
    )


def load_tokenizer(name_or_path: str | Path, *, required: bool = True) -> Any:
    """The model's tokenizer. A model without one is an error when `required`, else None; a tokenizer that is
    present but cannot be loaded is always an error (never silently dropped)."""
    from transformers import AutoTokenizer

    path = resolve(str(name_or_path)).path
    if not has_tokenizer(path):
        if not required:
            return None
        raise SparselmError(
            f"'{name_or_path}' has no tokenizer; save it next to the model (tokenizer.save_pretrained(DIR))"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SparselmError(
            f"the tokenizer of '{name_or_path}' cannot be loaded ({first}); re-save it with tokenizer.save_pretrained"
        ) from None


DEVICE_HELP = "cpu, cuda, or auto (cuda when a GPU is available, else cpu)."


def resolve_device(name: str) -> torch.device:
    """The torch device of a --device value: cpu, cuda (an error without a GPU) or auto (cuda when available)."""
    if name not in ("cpu", "cuda", "auto"):
        raise SparselmError(f"--device '{name}' is not one of cpu, cuda, auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise SparselmError("--device cuda but no GPU is visible to torch; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def offload_kwargs(max_memory: int, device: torch.device, folder: Path) -> dict[str, Any]:
    """`from_pretrained` arguments for accelerate's big-model inference: the weights that do not fit in
    `max_memory` bytes (on the GPU, then the CPU, for cuda) are offloaded to `folder` and streamed in per forward."""
    budget: dict[int | str, int] = {"cpu": max_memory}
    if device.type == "cuda":
        budget = {device.index or 0: max_memory, "cpu": max_memory}
    return {"device_map": "auto", "max_memory": budget, "offload_folder": str(folder)}


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter in memory (offloaded ones sit on the meta device), else CPU."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


INDEX = "model.safetensors.index.json"
COPY_BYTES = 4 << 20  # a slice of rows copied at a time by `Checkpoint.write`
_TORCH_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_DTYPE = {dtype: name for name, dtype in _TORCH_DTYPE.items()}
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """The safetensors shards of a plain model directory: which file holds each tensor, and its shape and dtype."""

    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]

    @staticmethod
    def present(path: Path) -> bool:
        """Whether `path` is a plain directory with safetensors weights (what streaming and offloading read)."""
        return not is_packed(path) and ((path / INDEX).is_file() or (path / SINGLE).is_file())

    @classmethod
    def open(cls, path: Path, shown: str) -> Checkpoint:
        from safetensors import safe_open

        if is_packed(path):
            raise SparselmError(f"'{shown}' is packed; --max-memory streams plain safetensors, unpack it first")
        index = path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: path / file for name, file in weight_map.items()}
        elif (path / SINGLE).is_file():
            with safe_open(path / SINGLE, "pt") as fh:
                files = {name: path / SINGLE for name in fh.keys()}
        else:
            raise SparselmError(f"'{shown}' has no safetensors weights; --max-memory streams only safetensors shards")
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(files.values())):
            with safe_open(file, "pt") as fh:
                shapes.update({name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()})
        return cls(files, shapes)

    def read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones as float32 (as `sparselm.load` gives them), on `device`."""
        from safetensors import safe_open

        found: dict[str, torch.Tensor] = {}
        for file in sorted({self.files[n] for n in names}):
            with safe_open(file, "pt") as fh:
                for name in (n for n in names if self.files[n] == file):
                    tensor = fh.get_tensor(name)
                    found[name] = (tensor.float() if tensor.is_floating_point() else tensor).to(device)
        return found

    def float_bytes(self, names: list[str]) -> int:
        return sum(4 * math.prod(self.shapes[n]) for n in names)

    def rows(self, name: str, ids: list[int], device: torch.device) -> torch.Tensor:
        """Rows `ids` (ascending) of a tensor, floating ones as float32, read with plain file reads: unlike a mapping
        of the shard, which pulls whole neighbourhoods of pages into the process, only these rows are held (what an
        embedding lookup needs of a large vocabulary)."""
        start, dtype = self._data_start(name)
        shape = self.shapes[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((len(ids), *shape[1:]), dtype=dtype)
        buffer = tensor_bytes(out)
        with open(self.files[name], "rb") as fh:
            done = 0
            for first, count in _runs(ids):
                fh.seek(start + first * row)
                if fh.readinto(buffer[done * row : (done + count) * row]) != count * row:
                    raise SparselmError(f"{self.files[name]} is shorter than its header says; copy the model again")
                done += count
        return (out.float() if out.is_floating_point() else out).to(device)

    def _data_start(self, name: str) -> tuple[int, torch.dtype]:
        """Where a tensor's bytes begin in its shard, and their dtype (from the safetensors header: an 8-byte length
        and JSON giving each tensor's offsets from the end of the header)."""
        with open(self.files[name], "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            entry = json.loads(fh.read(length))[name]
        return 8 + length + entry["data_offsets"][0], _TORCH_DTYPE[entry["dtype"]]

    def write(self, target: Path, names: list[str], held: dict[str, torch.Tensor]) -> int:
        """Write the named tensors to one safetensors file, floating ones as float32 (as `read` gives them): those in
        `held` from memory, the others straight from the shards a slice of rows at a time (`rows`), so that a tensor
        nobody changed never becomes resident (an embedding matrix is a streamed run's largest tensor). safetensors
        writes only whole in-memory tensors, so the file (an 8-byte header length, a JSON header, the data) is written
        here and read back by safetensors like any other. Returns the bytes of tensor data."""
        dtypes: dict[str, torch.dtype] = {}
        for n in names:
            stored = held[n].dtype if n in held else self._data_start(n)[1]
            dtypes[n] = torch.float32 if stored.is_floating_point else stored
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in names:
            size = math.prod(self.shapes[n]) * dtypes[n].itemsize
            header[n] = {"dtype": _SAFETENSORS_DTYPE[dtypes[n]], "shape": list(self.shapes[n]),
                         "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for n in names:
                for part in self._parts(n, held.get(n)):
                    out.write(tensor_bytes(part.to(dtypes[n]).contiguous()))
        return offset

    def _parts(self, name: str, held: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """A tensor in slices of rows of at most `COPY_BYTES` (float32): from memory, or each read from the shards
        with `rows`."""
        shape = self.shapes[name]
        if not shape:
            yield held.detach().to("cpu") if held is not None else self.read([name], torch.device("cpu"))[name]
            return
        rows = max(1, COPY_BYTES // max(1, 4 * math.prod(shape[1:])))
        if held is not None:
            yield from held.detach().to("cpu").split(rows)
            return
        for start in range(0, shape[0], rows):
            yield self.rows(name, list(range(start, min(start + rows, shape[0]))), torch.device("cpu"))


def _runs(ids: list[int]) -> Iterator[tuple[int, int]]:
    """Ascending ids as (first, count) runs of consecutive ones."""
    first = previous = None
    for i in ids:
        if previous is not None and i == previous + 1:
            previous = i
            continue
        if first is not None:
            yield first, previous - first + 1
        first = previous = i
    if first is not None:
        yield first, previous - first + 1


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared with it (no copy): what file reads fill and writes take."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def put_tensor(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a tensor in place of the (meta) parameter or buffer `name` of `module`, as a Parameter where it is one."""
    owner, _, attr = name.rpartition(".")
    old = module.get_submodule(owner)._parameters.get(attr)
    place(module, name, torch.nn.Parameter(tensor, requires_grad=old.requires_grad) if old is not None else tensor)


def has_generation_config(path: Path) -> bool:
    return (path / GENERATION_CONFIG).is_file()


def free_heap() -> None:
    """Hand freed memory back to the OS (glibc), so a streamed run's peak stays at what it holds."""
    heap_trimmer()(0)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux: /proc/self/statm), or None where the OS does not say."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
