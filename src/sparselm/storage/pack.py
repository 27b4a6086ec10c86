"""Pack a model directory into sparse safetensors files and back, with a manifest of checksums.

A packed directory holds the model's small files as they were (tokenizer, provenance.json), config.json with its
layout's entries added (see `layouts.py`), the coded weights in one safetensors file, and `sparselm-pack.json`: the
format version, a sha256 per file, the source's config.json text, and per tensor its codec, shape, dtype, the
safetensors keys of its parts and the file it came from. Unpacking rebuilds the same tensors bit for bit, in the
same files as the source, and the source's config.json byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SparselmError
from ..facts import CONFIG_JSON as CONFIG
from ..facts import PROVENANCE_JSON
from ..io import atomic_dir, atomic_write_json
from ..progress import SILENT, Progress
from ..sources import read_provenance, resolve, write_provenance
from .codecs import Encoded, get_codec, keep_mask
from .layouts import LAYOUTS, Layout, all_formats, layout_of_format
from .zstd import compress_parts, decompress_parts

MANIFEST = "sparselm-pack.json"
FORMAT_NAME = "sparselm-pack"
# Version 2 adds the layout's config.json entries (transformers refuses the directory) and `source_config`.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NO_GAIN = "no tensor has enough zeros to be stored smaller: the packed copy gains nothing"

Format = Literal["auto", "bitmask", "csr", "rice", "compressed-tensors"]
DType = Literal["keep", "fp16", "bf16", "int8"]
FORMATS: dict[str, tuple[str, ...]] = all_formats()
DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": None}  # int8: see int8_matrices


def is_packed(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise SparselmError(
            f"'{path}' holds only pickle weight files; sparselm packs safetensors only. Re-save the model with "
            "save_pretrained(dir, safe_serialization=True) and pack that"
        )
    raise SparselmError(f"'{path}' has no .safetensors weight files to pack")


def choose_encoding(tensor: torch.Tensor, codecs: tuple[str, ...], use_zstd: bool) -> Encoded:
    """The smallest of dense and each applicable codec (each with and without zstd on its parts)."""
    best = get_codec("dense").encode(tensor)
    if not tensor.is_floating_point() or tensor.dim() < 2:
        return best
    zero_fraction = 1.0 - float(keep_mask(tensor).float().mean())
    if zero_fraction * tensor.element_size() * 8 <= 1.0:  # no mask costs less than the zeros it saves
        return best
    for name in codecs:
        codec = get_codec(name)
        if not codec.applies(tensor):
            continue
        encoded = codec.encode(tensor)
        for candidate in (encoded, compress_parts(encoded)) if use_zstd else (encoded,):
            if candidate.nbytes < best.nbytes:
                best = candidate
    return best


def int8_encoding(tensor: torch.Tensor, transposed: bool, use_zstd: bool) -> Encoded:
    """Weight-only int8 of one matrix (per output channel), with zstd on its parts where that is smaller."""
    encoded = get_codec("int8").encode(tensor, per_column=transposed)
    return min((encoded, compress_parts(encoded)) if use_zstd else (encoded,), key=lambda e: e.nbytes)


def int8_matrices(path: Path) -> dict[str, bool]:
    """Checkpoint names of the matrices that `--dtype int8` quantises (those sparselm prunes: Linear/Conv1D weights
    in transformer blocks), each with whether it is stored in × out (Conv1D), found on an empty model from config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    from ..weights import select_matrices

    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModel.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        raise SparselmError(
            f"--dtype int8 needs the model's architecture to find its weight matrices, and '{path}' has none that "
            f"transformers knows ({exc}); pack it with --dtype keep"
        ) from None
    prefix = model.base_model_prefix
    found: dict[str, bool] = {}
    for matrix in select_matrices(model):
        found[matrix.name] = matrix.transposed
        found[f"{prefix}.{matrix.name}"] = matrix.transposed
    return found


@dataclass(frozen=True)
class PackedSizes:
    """Bytes of a model's weights before and after coding; `to_json()` is the manifest's summary."""

    format: str
    dtype: str
    tensors: int
    sparse_tensors: int
    codecs: dict[str, int]
    dense_bytes: int
    packed_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.packed_bytes if self.packed_bytes else 1.0

    @property
    def gain(self) -> bool:
        return self.packed_bytes < self.dense_bytes

    @property
    def message(self) -> str | None:
        return None if self.gain else NO_GAIN

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "gain": self.gain, "message": self.message}


@dataclass(frozen=True)
class PackSummary:
    """What `pack` wrote: the weights' sizes and the files' sizes; `to_json()` is what `sparselm pack --json` prints."""

    sizes: PackedSizes
    file_bytes_packed: int
    file_bytes_dense: int
    out: Path

    def to_json(self) -> dict[str, Any]:
        return {
            **self.sizes.to_json(), "file_bytes_packed": self.file_bytes_packed,
            "file_bytes_dense": self.file_bytes_dense, "out": str(self.out),
        }


@dataclass(frozen=True)
class UnpackSummary:
    """What `unpack` wrote: the dense directory, how many tensors and which weight files."""

    out: Path
    tensors: int
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "tensors": self.tensors, "files": self.files}


def pack(
    src_dir: str | Path,
    out_dir: str | Path,
    format: Format = "auto",
    dtype: DType = "keep",
    progress: Progress = SILENT,
    force: bool = False,
) -> PackSummary:
    """Write a packed copy of a model directory (or alias) to out_dir; returns sizes per tensor and in total.

    `out_dir` is replaced only when sparselm wrote it (or it is empty) unless `force`."""
    if format not in FORMATS:
        raise SparselmError(f"unknown pack format '{format}'; choose one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise SparselmError(f"unknown --dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    source = resolve(str(src_dir))
    if is_packed(source.path):
        raise SparselmError(f"'{src_dir}' is already packed; unpack it first (sparselm unpack) or pack the dense model")
    files = source_weight_files(source.path)
    layout = layout_of_format(format)
    if dtype == "int8" and layout.name != "sparselm":
        raise SparselmError(f"--dtype int8 is stored in sparselm's own layout only; drop --format {format}")
    int8 = int8_matrices(source.path) if dtype == "int8" else {}
    stored: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict[str, Any]] = {}
    source_files: dict[str, dict[str, Any]] = {}
    progress.start("packing tensors", tensor_count(files))
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            source_files[file.name] = {"metadata": fh.metadata() or {}}
            for name in fh.keys():
                tensor = convert_dtype(fh.get_tensor(name), DTYPES[dtype])
                codecs = FORMATS[format] if layout.codes(name) else ()
                if name in int8:
                    encoded = int8_encoding(tensor, int8[name], use_zstd=layout.zstd)
                else:
                    encoded = choose_encoding(tensor, codecs, use_zstd=layout.zstd)
                keys = part_keys(layout, name, encoded)
                stored.update({keys[p]: t.contiguous() for p, t in encoded.parts.items()})
                tensors[name] = describe(name, tensor, encoded, keys, file.name)
                progress.advance()
    out = Path(out_dir)
    sizes = summarise(tensors, format, dtype)
    with atomic_dir(out, force) as tmp:
        save_file(stored, str(tmp / layout.weights_file), metadata={"format": "pt", "packed_by": "sparselm"})
        index = copy_small_files(source.path, tmp)
        source_config = (source.path / CONFIG).read_text()
        config = json.loads(source_config)
        atomic_write_json(tmp / CONFIG, {**config, **layout.config_entries(config, tensors, stored)})
        write_provenance(tmp, source, **{**read_provenance(source.path), "packed": {"format": format, "dtype": dtype}})
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "layout": layout.name,
            "dtype": dtype,
            "files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
            "source_files": source_files,
            "source_index": index,
            "source_config": source_config,
            "tensors": tensors,
            "summary": sizes.to_json(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        file_bytes_packed = sum(p.stat().st_size for p in tmp.iterdir())
    return PackSummary(sizes, file_bytes_packed, sum(p.stat().st_size for p in files), out)


def tensor_count(files: list[Path]) -> int:
    """How many tensors the weight files hold (read from their headers)."""
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            total += len(fh.keys())
    return total


def convert_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def part_keys(layout: Layout, name: str, encoded: Encoded) -> dict[str, str]:
    """Safetensors keys: dense tensors keep their name; coded parts are keyed as the layout says."""
    if encoded.codec == "dense":
        return {"data": name}
    return {part: layout.part_key(name, part) for part in encoded.parts}


def describe(name: str, tensor: torch.Tensor, encoded: Encoded, keys: dict[str, str], file: str) -> dict[str, Any]:
    zeros = int((~keep_mask(tensor)).sum()) if tensor.is_floating_point() and tensor.numel() else 0
    return {
        "codec": encoded.codec,
        "shape": list(encoded.shape),
        "dtype": str(encoded.dtype).removeprefix("torch."),
        "meta": encoded.meta,
        "keys": keys,
        "file": file,
        "numel": tensor.numel(),
        "zeros": zeros,
        "dense_bytes": tensor.numel() * tensor.element_size(),
        "packed_bytes": encoded.nbytes,
    }


def summarise(tensors: dict[str, dict[str, Any]], format: str, dtype: str) -> PackedSizes:
    codecs: dict[str, int] = {}
    for t in tensors.values():
        label = t["codec"] + ("+zstd" if t["meta"].get("zstd") else "")
        codecs[label] = codecs.get(label, 0) + 1
    return PackedSizes(
        format=format,
        dtype=dtype,
        tensors=len(tensors),
        sparse_tensors=sum(1 for t in tensors.values() if t["codec"] != "dense"),
        codecs=codecs,
        dense_bytes=sum(t["dense_bytes"] for t in tensors.values()),
        packed_bytes=sum(t["packed_bytes"] for t in tensors.values()),
    )


def copy_small_files(src: Path, dst: Path) -> dict[str, Any] | None:
    """Copy config, tokenizer and other small files; weights are re-coded and pickle files are left behind."""
    index = None
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name == MANIFEST or p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES:
            continue
        if p.name.endswith(INDEX_SUFFIX):
            index = {"name": p.name, "content": json.loads(p.read_text())}
            continue
        shutil.copy2(p, dst / p.name)
    return index


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a packed directory, after checking its format version and every file's checksum."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SparselmError(
            f"'{path}' is not a packed sparselm directory (no {MANIFEST}); pack it with sparselm pack"
        ) from None
    except json.JSONDecodeError as exc:
        raise SparselmError(
            f"'{path / MANIFEST}' is corrupt ({exc.msg}); re-create the directory with sparselm pack"
        ) from None
    if manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("version"), int):
        raise SparselmError(f"'{path / MANIFEST}' is not a sparselm pack manifest; re-create it with sparselm pack")
    if manifest["version"] not in READABLE_VERSIONS:
        raise SparselmError(
            f"'{path}' uses packed format version {manifest['version']}, but this sparselm reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}; open it with the sparselm version that wrote it (or upgrade "
            "sparselm)"
        )
    if manifest.get("layout") not in LAYOUTS:
        raise SparselmError(
            f"'{path / MANIFEST}' names an unknown layout '{manifest.get('layout')}'; open it with the sparselm "
            "version that wrote it (or upgrade sparselm)"
        )
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise SparselmError(f"'{file}' is missing from the packed directory; copy the whole directory again")
        if file.stat().st_size != info["bytes"] or sha256_of(file) != info["sha256"]:
            raise SparselmError(
                f"checksum mismatch in '{file}': the file is corrupt or truncated; copy it again or re-pack the model"
            )
    return manifest


def iter_decoded(path: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(source file, tensor name, tensor) for every tensor of a packed directory, decoded bit-exactly."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    # pread, not mmap: pages of a mapped file would stay resident and count against the load's memory
    with safe_open(str(path / LAYOUTS[manifest["layout"]].weights_file), framework="pt", backend="pread") as fh:
        for name, info in manifest["tensors"].items():
            parts = {part: fh.get_tensor(key) for part, key in info["keys"].items()}
            encoded = Encoded(info["codec"], tuple(info["shape"]), getattr(torch, info["dtype"]), parts, info["meta"])
            yield info["file"], name, get_codec(info["codec"]).decode(decompress_parts(encoded))


def source_config_text(path: Path, manifest: dict[str, Any]) -> str:
    """The source's config.json text; for version-1 manifests, the packed one less its layout's entries."""
    if "source_config" in manifest:
        return manifest["source_config"]
    text = (path / CONFIG).read_text()
    config = json.loads(text)
    added = [key for key in LAYOUTS[manifest["layout"]].config_keys if key in config]
    if not added:
        return text
    return json.dumps({k: v for k, v in config.items() if k not in added}, indent=2) + "\n"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a packed directory, decoded, keyed by their original names."""
    return {name: tensor for _, name, tensor in iter_decoded(path)}


def unpack(src: str | Path, out: str | Path, progress: Progress = SILENT, force: bool = False) -> UnpackSummary:
    """Rebuild the dense model directory (same tensors, same weight files) from a packed one; `out` is replaced only
    when sparselm wrote it (or it is empty) unless `force`."""
    src = Path(src)
    manifest = read_manifest(src)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    progress.start("unpacking tensors", len(manifest["tensors"]))
    for file, name, tensor in iter_decoded(src, manifest):
        by_file.setdefault(file, {})[name] = tensor
        progress.advance()
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        write_dense_dir(src, tmp, manifest, by_file)
    return UnpackSummary(out, len(manifest["tensors"]), sorted(by_file))


def write_dense_dir(
    src: Path, dst: Path, manifest: dict[str, Any], by_file: dict[str, dict[str, torch.Tensor]]
) -> None:
    for file, state in by_file.items():
        metadata = manifest["source_files"].get(file, {}).get("metadata") or {"format": "pt"}
        save_file(state, str(dst / file), metadata=metadata)
    weights = LAYOUTS[manifest["layout"]].weights_file
    for p in src.iterdir():
        if p.is_file() and p.name not in (MANIFEST, weights, CONFIG, PROVENANCE_JSON):
            shutil.copy2(p, dst / p.name)
    unpacked = {key: value for key, value in read_provenance(src).items() if key != "packed"}
    atomic_write_json(dst / PROVENANCE_JSON, unpacked)  # a dense directory again: loaders must not look for a manifest
    (dst / CONFIG).write_text(source_config_text(src, manifest))
    if manifest.get("source_index"):
        atomic_write_json(dst / manifest["source_index"]["name"], manifest["source_index"]["content"])
