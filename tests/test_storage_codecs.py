"""Codecs: bit-exact round trips over shapes, sparsities and dtypes, and sizes near the information bound."""

from __future__ import annotations

import math

import pytest
import torch

from sparselm.storage import CODECS, get_codec
from sparselm.storage.codecs import keep_mask
from sparselm.storage.zstd import compress_parts, decompress_parts
from sparselm.errors import SparselmError

SPARSE_CODECS = ["bitmask", "csr", "rice"]


def sparse_tensor(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def entropy(s: float) -> float:
    return 0.0 if s in (0.0, 1.0) else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))


@pytest.mark.parametrize("codec", [*SPARSE_CODECS, "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(37, 53), (64, 128), (3, 5, 7)])
def test_round_trip_is_bit_exact(codec, dtype, sparsity, shape):
    t = sparse_tensor(shape, sparsity, dtype)
    c = get_codec(codec)
    for encoded in (c.encode(t), compress_parts(c.encode(t))):
        back = c.decode(decompress_parts(encoded))
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(bits(back), bits(t))


@pytest.mark.parametrize("codec", [*SPARSE_CODECS, "compressed-tensors"])
def test_negative_zero_and_nan_survive(codec):
    t = sparse_tensor((16, 24), 0.9, torch.float32)
    t[0, 0], t[1, 1], t[2, 2] = -0.0, float("nan"), float("inf")
    c = get_codec(codec)
    assert torch.equal(bits(c.decode(c.encode(t))), bits(t))


def test_compressed_tensors_codec_round_trips_matrices():
    c = get_codec("compressed-tensors")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = sparse_tensor((33, 70), 0.8, dtype)
        enc = c.encode(t)
        assert set(enc.parts) == {"shape", "compressed", "bitmask", "row_offsets"}
        assert enc.parts["bitmask"].shape == (33, 9)
        assert torch.equal(bits(c.decode(enc)), bits(t))


def test_csr_uses_narrow_indices_and_deltas_for_wide_rows():
    c = get_codec("csr")
    narrow = c.encode(sparse_tensor((8, 200), 0.9, torch.float32))
    assert narrow.parts["columns"].dtype == torch.uint8 and not narrow.meta["delta_columns"]
    wide_t = sparse_tensor((2, 70_000), 0.999, torch.float16)
    wide = c.encode(wide_t)
    assert wide.meta["delta_columns"] and wide.parts["columns"].dtype == torch.uint16
    assert torch.equal(bits(c.decode(wide)), bits(wide_t))


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9, 0.95, 0.99])
def test_rice_mask_is_close_to_the_entropy(sparsity):
    t = sparse_tensor((256, 512), sparsity, torch.float16, seed=1)
    s = 1.0 - float(keep_mask(t).float().mean())
    enc = get_codec("rice").encode(t)
    mask_bits = 8 * (enc.parts["unary"].numel() + enc.parts["remainders"].numel())
    assert mask_bits <= 1.05 * entropy(s) * t.numel() + 64
    bound = (entropy(s) + (1 - s) * 16) * t.numel() / 8
    assert enc.nbytes <= 1.10 * bound


def test_codec_registry_knows_all_codecs_and_rejects_unknown():
    assert {"dense", "bitmask", "csr", "rice", "compressed-tensors"} <= set(CODECS)
    with pytest.raises(SparselmError, match="unknown codec 'nope'"):
        get_codec("nope")


def test_zstd_keeps_a_part_only_where_it_pays():
    t = sparse_tensor((64, 64), 0.99, torch.float32)
    enc = get_codec("bitmask").encode(t)
    z = compress_parts(enc)
    assert "mask" in z.meta["zstd"] and z.nbytes < enc.nbytes
    random_bytes = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dense = get_codec("dense").encode(random_bytes)
    assert compress_parts(dense) is dense
