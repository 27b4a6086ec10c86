"""Optional zstd on top of any codec's parts, kept per part only where it makes the part smaller."""

from __future__ import annotations

import torch
import zstandard

from .codecs import Encoded

LEVEL = 3
MIN_SAVING = 0.02


def part_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def compress_parts(encoded: Encoded) -> Encoded:
    """Replace each part by its zstd frame (a uint8 tensor) where that saves at least MIN_SAVING of its size."""
    parts: dict[str, torch.Tensor] = {}
    zstd_meta: dict[str, dict] = {}
    compressor = zstandard.ZstdCompressor(level=LEVEL)
    for name, part in encoded.parts.items():
        raw = part_bytes(part)
        packed = compressor.compress(raw) if raw else raw
        if raw and len(packed) < len(raw) * (1 - MIN_SAVING):
            parts[name] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            zstd_meta[name] = {"dtype": str(part.dtype).removeprefix("torch."), "numel": part.numel()}
        else:
            parts[name] = part
    if not zstd_meta:
        return encoded
    return Encoded(encoded.codec, encoded.shape, encoded.dtype, parts, {**encoded.meta, "zstd": zstd_meta})


def decompress_parts(encoded: Encoded) -> Encoded:
    zstd_meta = encoded.meta.get("zstd")
    if not zstd_meta:
        return encoded
    parts = dict(encoded.parts)
    decompressor = zstandard.ZstdDecompressor()
    for name, info in zstd_meta.items():
        dtype = getattr(torch, info["dtype"])
        size = info["numel"] * torch.empty(0, dtype=dtype).element_size()
        raw = decompressor.decompress(part_bytes(parts[name]), max_output_size=size)
        parts[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(-1)
    return Encoded(encoded.codec, encoded.shape, encoded.dtype, parts, encoded.meta)
