"""Pack a model directory into sparse safetensors files and back, with a manifest of checksums.

A packed directory holds the model's small files as they were (config.json, tokenizer, provenance.json), the coded
weights in one safetensors file, and `sparselm-pack.json`: the format version, a sha256 per file, and per tensor
its codec, shape, dtype, the safetensors keys of its parts and the file it came from. Unpacking rebuilds the same
tensors bit for bit, in the same files as the source.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SparselmError
from ..io import atomic_dir, atomic_write_json
from . import bitmask, csr, rice  # noqa: F401  (register the codecs)
from . import compressed_tensors as ct
from .codecs import Encoded, get_codec, keep_mask
from .zstd import compress_parts, decompress_parts

MANIFEST = "sparselm-pack.json"
FORMAT_NAME = "sparselm-pack"
FORMAT_VERSION = 1
PACKED_FILE = "model.packed.safetensors"
CT_FILE = "model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Format = Literal["auto", "bitmask", "csr", "rice", "compressed-tensors"]
DType = Literal["keep", "fp16", "bf16"]
FORMATS: dict[str, tuple[str, ...]] = {
    "auto": ("bitmask", "csr", "rice"),
    "bitmask": ("bitmask",),
    "csr": ("csr",),
    "rice": ("rice",),
    "compressed-tensors": (ct.NAME,),
}
DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[str], None]


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


def pack(
    src_dir: str | Path,
    out_dir: str | Path,
    format: Format = "auto",
    dtype: DType = "keep",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a packed copy of a model directory (or alias) to out_dir; returns sizes per tensor and in total."""
    from ..models import read_provenance, resolve, write_provenance

    if format not in FORMATS:
        raise SparselmError(f"unknown pack format '{format}'; choose one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise SparselmError(f"unknown --dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    source = resolve(str(src_dir))
    if is_packed(source.path):
        raise SparselmError(f"'{src_dir}' is already packed; unpack it first (sparselm unpack) or pack the dense model")
    files = source_weight_files(source.path)
    is_ct = format == "compressed-tensors"
    keys_file = CT_FILE if is_ct else PACKED_FILE
    stored: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict[str, Any]] = {}
    source_files: dict[str, dict[str, Any]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            source_files[file.name] = {"metadata": fh.metadata() or {}}
            for name in fh.keys():
                tensor = convert_dtype(fh.get_tensor(name), DTYPES[dtype])
                encoded = choose_encoding(tensor, FORMATS[format], use_zstd=not is_ct)
                keys = part_keys(name, encoded, is_ct)
                stored.update({keys[p]: t.contiguous() for p, t in encoded.parts.items()})
                tensors[name] = describe(name, tensor, encoded, keys, file.name)
                if progress:
                    progress(name)
    out = Path(out_dir)
    summary = summarise(tensors, format, dtype)
    with atomic_dir(out) as tmp:
        save_file(stored, str(tmp / keys_file), metadata={"format": "pt", "packed_by": "sparselm"})
        index = copy_small_files(source.path, tmp)
        if is_ct:
            add_ct_config(tmp, tensors, stored)
        write_provenance(tmp, source, **{**read_provenance(source.path), "packed": {"format": format, "dtype": dtype}})
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "layout": "compressed-tensors" if is_ct else "sparselm",
            "dtype": dtype,
            "files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
            "source_files": source_files,
            "source_index": index,
            "tensors": tensors,
            "summary": summary,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        summary["file_bytes_packed"] = sum(p.stat().st_size for p in tmp.iterdir())
    summary["file_bytes_dense"] = sum(p.stat().st_size for p in files)
    summary["out"] = str(out)
    return summary


def convert_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def part_keys(name: str, encoded: Encoded, is_ct: bool) -> dict[str, str]:
    """Safetensors keys: dense tensors keep their name; parts are `name.part` (compressed-tensors) or `name:part`."""
    if encoded.codec == "dense":
        return {"data": name}
    sep = "." if is_ct else ":"
    return {part: f"{name}{sep}{part}" for part in encoded.parts}


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


def summarise(tensors: dict[str, dict[str, Any]], format: str, dtype: str) -> dict[str, Any]:
    dense = sum(t["dense_bytes"] for t in tensors.values())
    packed = sum(t["packed_bytes"] for t in tensors.values())
    codecs: dict[str, int] = {}
    for t in tensors.values():
        label = t["codec"] + ("+zstd" if t["meta"].get("zstd") else "")
        codecs[label] = codecs.get(label, 0) + 1
    gain = packed < dense
    return {
        "format": format,
        "dtype": dtype,
        "tensors": len(tensors),
        "sparse_tensors": sum(1 for t in tensors.values() if t["codec"] != "dense"),
        "codecs": codecs,
        "dense_bytes": dense,
        "packed_bytes": packed,
        "ratio": dense / packed if packed else 1.0,
        "gain": gain,
        "message": None if gain else "no tensor has enough zeros to be stored smaller: the packed copy gains nothing",
    }


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


def add_ct_config(tmp: Path, tensors: dict[str, dict[str, Any]], stored: dict[str, torch.Tensor]) -> None:
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise SparselmError(
            "the model already has a quantization_config; compressed-tensors packing needs a plain model"
        )
    coded = [n for n, t in tensors.items() if t["codec"] == ct.NAME]
    numel = sum(tensors[n]["numel"] for n in coded)
    zeros = sum(tensors[n]["zeros"] for n in coded)
    masks = [ct_bitmask_dense(stored, tensors[n]) for n in coded]
    config["quantization_config"] = ct.config_entry(
        sorted(n.removesuffix(".weight") for n in coded), zeros / numel if numel else 0.0, ct.sparsity_structure(masks)
    )
    atomic_write_json(config_path, config)


def ct_bitmask_dense(stored: dict[str, torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
    parts = {p: stored[k] for p, k in info["keys"].items()}
    return get_codec(ct.NAME).decode(Encoded(ct.NAME, tuple(info["shape"]), getattr(torch, info["dtype"]), parts))


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
    if manifest["version"] != FORMAT_VERSION:
        raise SparselmError(
            f"'{path}' uses packed format version {manifest['version']}, but this sparselm reads version "
            f"{FORMAT_VERSION}; open it with the sparselm version that wrote it (or upgrade sparselm)"
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
    weights = CT_FILE if manifest["layout"] == "compressed-tensors" else PACKED_FILE
    with safe_open(str(path / weights), framework="pt") as fh:
        for name, info in manifest["tensors"].items():
            parts = {part: fh.get_tensor(key) for part, key in info["keys"].items()}
            encoded = Encoded(info["codec"], tuple(info["shape"]), getattr(torch, info["dtype"]), parts, info["meta"])
            yield info["file"], name, get_codec(info["codec"]).decode(decompress_parts(encoded))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a packed directory, decoded, keyed by their original names."""
    return {name: tensor for _, name, tensor in iter_decoded(path)}


def unpack(src: str | Path, out: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Rebuild the dense model directory (same tensors, same weight files) from a packed one."""
    src = Path(src)
    manifest = read_manifest(src)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for file, name, tensor in iter_decoded(src, manifest):
        by_file.setdefault(file, {})[name] = tensor
        if progress:
            progress(name)
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_dense_dir(src, tmp, manifest, by_file)
    return {"out": str(out), "tensors": len(manifest["tensors"]), "files": sorted(by_file)}


def write_dense_dir(
    src: Path, dst: Path, manifest: dict[str, Any], by_file: dict[str, dict[str, torch.Tensor]]
) -> None:
    for file, state in by_file.items():
        metadata = manifest["source_files"].get(file, {}).get("metadata") or {"format": "pt"}
        save_file(state, str(dst / file), metadata=metadata)
    weights = CT_FILE if manifest["layout"] == "compressed-tensors" else PACKED_FILE
    for p in src.iterdir():
        if p.is_file() and p.name not in (MANIFEST, weights):
            shutil.copy2(p, dst / p.name)
    if manifest["layout"] == "compressed-tensors":
        config = json.loads((dst / "config.json").read_text())
        config.pop("quantization_config", None)
        atomic_write_json(dst / "config.json", config)
    if manifest.get("source_index"):
        atomic_write_json(dst / manifest["source_index"]["name"], manifest["source_index"]["content"])


@contextmanager
def unpacked(path: str | Path) -> Iterator[Path]:
    """A temporary dense copy of a packed directory, for loaders that need files (removed afterwards)."""
    import tempfile

    from ..models import cache_dir

    root = cache_dir() / "unpacked"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        target = Path(tmp) / Path(path).name
        unpack(path, target)
        yield target
