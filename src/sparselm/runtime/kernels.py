"""Sparse matrix kernels for `y = x Wᵀ`: how to build each sparse form of W and how to multiply by it.

CPU kernels go through `torch.sparse.mm(W_sparse, Xᵀ)` with activations feature-major (in × tokens), which the
measurements in the project notes show is 3–6× faster than `F.linear(x, W_sparse)`. CSR indices are int32 (MKL's
native width, saving a conversion on every call). BSR is offered only when the mask is block-structured. The 2:4
semi-structured kernel exists only on CUDA. `csr16`, `bitmap` and their `-int8` forms are sparselm's own C++ kernels
(runtime.extension): CSR with 16-bit column indices, or one bit per weight, with fp32/bf16 values or int8 values
with a scale per output row (weight-only int8), for fp32 or bf16 activations; a row-parallel SpMM for many tokens
and an SpMV for one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SparselmError
from ..masks import is_n_of_m
from ..storage.int8 import quantize_rows
from . import extension

BLOCK_SIZES = (16, 8)
BLOCK_SLACK = 1.15
TILE = 8


@dataclass(frozen=True)
class Kernel:
    name: str
    index_bytes: float  # bytes of index stored per stored value (what the dispatch's sparsity bound is made of)
    build: Callable[[torch.Tensor], torch.Tensor]
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (built weight, x [..., in]) → [..., out]
    index_bytes_per_weight: float = 0.0  # bytes of index per weight of the matrix, stored or not (a bitmap's bit)
    native: bool = False  # sparselm's C++ kernel: runs only when the extension is loaded
    max_columns: int | None = None  # the widest weight (input features) its indices can address


def any_rank(matmul2d: Callable[[Any, torch.Tensor], torch.Tensor]) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A (tokens × in) → (tokens × out) product applied to activations [..., in], giving [..., out]."""

    def matmul(weight: Any, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return matmul2d(weight, x)
        y = matmul2d(weight, x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1])

    return matmul


def build_csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = weight.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), csr.shape,
            check_invariants=False,
        )


def feature_major_mm(sparse_weight: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """(tokens × in) activations → (tokens × out), computed as W · Xᵀ with a sparse W.

    Xᵀ is made contiguous first: handed a strided view, the sparse product runs 1.3–3× slower than the copy costs.
    The product is written straight into uninitialised memory (beta=0 ignores it): `torch.sparse.mm` would zero a
    buffer and copy the result out of it, 4–8% of the call.
    """
    out = torch.empty(sparse_weight.shape[0], x2d.shape[0], dtype=x2d.dtype, device=x2d.device)
    return torch.addmm(out, sparse_weight, transposed_copy(x2d), beta=0, out=out).t()


def transposed_copy(x2d: torch.Tensor) -> torch.Tensor:
    """x2dᵀ, contiguous. Copied in 8 × 8 tiles where the shape allows: a plain transposing copy walks one side
    with a large stride and ran 1.7–2.2× slower for 128–2048 tokens × 576 features (no slower elsewhere)."""
    rows, cols = x2d.shape
    if rows % TILE or cols % TILE or not x2d.is_contiguous():
        return x2d.t().contiguous()
    tiles = x2d.view(rows // TILE, TILE, cols // TILE, TILE).permute(2, 3, 0, 1)
    return tiles.contiguous().view(cols, rows)


def token_major(y: torch.Tensor) -> torch.Tensor:
    """A [..., out] result of a sparse product (feature-major underneath), made contiguous."""
    if y.is_contiguous():
        return y
    rows = y.reshape(-1, y.shape[-1])  # a view: the leading dimensions of a feature-major result merge
    return transposed_copy(rows.t()).view(y.shape)


def semi_structured_mm(sparse_weight: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    return F.linear(x2d, sparse_weight)


def build_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.detach())


def bsr_builder(block: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def build(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to_sparse_bsr((block, block))

    return build


@dataclass(frozen=True)
class Csr16:
    """A (rows × cols) matrix as CSR with int16 column indices (read as unsigned: up to 65536 columns); int8 values
    come with one fp32 scale per row (`scales` is empty otherwise)."""

    rowptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]

    def to_dense(self) -> torch.Tensor:
        """The matrix as the kernels compute with it (int8 values times their row scale), in float32."""
        counts = self.rowptr.diff().long()
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), counts)
        dense = torch.zeros(self.shape, dtype=torch.float32)
        dense[rows, self.cols.long() & 0xFFFF] = self.values.float()
        return dense * self.scales[:, None] if self.scales.numel() else dense


MAX_CSR16_COLUMNS = 1 << 16


def build_csr16(weight: torch.Tensor, int8: bool = False) -> Csr16:
    """CSR16 of a (out × in) weight in its own dtype, or (int8) of its per-row int8 quantisation."""
    weight = weight.detach()
    if weight.shape[1] > MAX_CSR16_COLUMNS:
        raise SparselmError(f"csr16 addresses at most {MAX_CSR16_COLUMNS} input features, got {weight.shape[1]}")
    values_of, scales = quantize_rows(weight) if int8 else (weight, torch.empty(0))
    keep = values_of != 0
    rowptr = torch.zeros(weight.shape[0] + 1, dtype=torch.int32)
    rowptr[1:] = keep.sum(dim=1).cumsum(0)
    cols = keep.nonzero()[:, 1].to(torch.int32)
    cols = torch.where(cols >= 1 << 15, cols - (1 << 16), cols).to(torch.int16)  # the same 16 bits, as int16
    return Csr16(rowptr, cols, values_of[keep].contiguous(), scales.contiguous(), tuple(weight.shape))


def csr16_mm(sparse_weight: Csr16, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """[..., in] → [..., out], feature-major like `feature_major_mm` (contiguous for one token): an SpMV for one
    token, else an SpMM; the kernel transposes (and widens bf16) the activations itself unless they already are a
    feature-major view, and reshapes in C++ (a Python reshape on each side cost more than a small layer's product).
    `path` forces a CPU code path (portable|avx2|avx512|avx512bf16; default: the best one)."""
    w = sparse_weight
    return torch.ops.sparselm_kernels.mm(w.rowptr, w.cols, w.values, w.scales, x, extension.path_code(path))


BITMAP_BLOCK = 32
BITMAP_PADDING_BYTES = 64  # after the last row: the vector kernels load a whole vector's worth past a row's start


@dataclass(frozen=True)
class Bitmap:
    """A (rows × cols) matrix as one bit per weight and its stored values: bit i of masks[r, b] (int32 words, read as
    unsigned) says whether column 32·b + i of row r is stored; row r's values, in column order, start at
    offsets[r] in `values`, which ends in BITMAP_PADDING_BYTES of zeros. int8 values come with one fp32 scale per
    row (`scales` is empty otherwise). At 50% sparsity this reads 1.125 bytes per weight in bf16 where dense and
    CSR16 read 2, and 0.625 in int8 where dense int8 reads 1: the sparse form that can beat dense at moderate
    sparsity."""

    masks: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]

    def to_dense(self) -> torch.Tensor:
        """The matrix as the kernels compute with it (int8 values times their row scale), in float32."""
        rows, cols = self.shape
        bits = (self.masks[:, :, None] >> torch.arange(BITMAP_BLOCK, dtype=torch.int32)) & 1
        keep = bits.reshape(rows, -1)[:, :cols].bool()
        dense = torch.zeros(self.shape, dtype=torch.float32)
        dense[keep] = self.values[: int(self.offsets[-1])].float()
        return dense * self.scales[:, None] if self.scales.numel() else dense


def build_bitmap(weight: torch.Tensor, int8: bool = False) -> Bitmap:
    """The bitmap form of a (out × in) weight, values in the weight's dtype or (int8) its per-row int8 quantisation."""
    weight = weight.detach()
    rows, cols = weight.shape
    values_of, scales = quantize_rows(weight) if int8 else (weight, torch.empty(0))
    blocks = -(-cols // BITMAP_BLOCK)
    keep = torch.zeros(rows, blocks * BITMAP_BLOCK, dtype=torch.bool)
    keep[:, :cols] = values_of != 0
    words = (keep.view(rows, blocks, BITMAP_BLOCK).long() << torch.arange(BITMAP_BLOCK)).sum(-1)
    masks = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same 32 bits, as int32
    offsets = torch.zeros(rows + 1, dtype=torch.int32)
    offsets[1:] = keep.sum(dim=1).cumsum(0)
    padding = values_of.new_zeros(BITMAP_PADDING_BYTES // values_of.element_size())
    values = torch.cat([values_of[values_of != 0], padding])
    return Bitmap(masks.contiguous(), offsets, values.contiguous(), scales.contiguous(), (rows, cols))


def build_bitmap_int8(weight: torch.Tensor) -> Bitmap:
    return build_bitmap(weight, int8=True)


def bitmap_mm(sparse_weight: Bitmap, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """[..., in] → [..., out], like `csr16_mm`; one token's product expands each block's values to their columns
    (AVX-512; int8 values widened to fp32 first) and, for bf16 values and activations on CPUs with avx512_bf16,
    multiplies them with VDPBF16PS."""
    w = sparse_weight
    return torch.ops.sparselm_kernels.bitmap_mm(w.masks, w.offsets, w.values, w.scales, x, extension.path_code(path))


def build_csr16_int8(weight: torch.Tensor) -> Csr16:
    return build_csr16(weight, int8=True)


@dataclass(frozen=True)
class DenseInt8:
    """A (out × in) weight as int8 values with one fp32 scale per output row: weight-only int8, dense."""

    values: torch.Tensor
    scales: torch.Tensor


def build_dense_int8(weight: torch.Tensor) -> DenseInt8:
    values, scales = quantize_rows(weight)
    return DenseInt8(values.contiguous(), scales)


def dense_int8_mm(weight: DenseInt8, x2d: torch.Tensor) -> torch.Tensor:
    """(tokens × in) → (tokens × out) with torch's weight-only int8 GEMM, token-major."""
    return torch._weight_int8pack_mm(x2d.contiguous(), weight.values, weight.scales.to(x2d.dtype))


def build_dense_w8a8(weight: torch.Tensor) -> torch.Tensor:
    """The weight's per-row int8 quantisation (`quantize_rows`), prepacked for torch's dynamic-quantised int8 GEMM
    (fbgemm/oneDNN: the kernel of `torch.ao.quantization.quantize_dynamic`)."""
    values, scales = quantize_rows(weight)
    zero_points = torch.zeros(values.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch._make_per_channel_quantized_tensor(values, scales.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


def dense_w8a8_mm(packed: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """(tokens × in) → (tokens × out), token-major: int8 weights times activations quantised on the fly (one affine
    uint8 scale per call, over all tokens, at the 7-bit range torch uses on x86 against VPMADDUBSW saturation)."""
    return torch.ops.quantized.linear_dynamic(x2d.float(), packed, True).to(x2d.dtype)


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("csr", 4, build_csr, any_rank(feature_major_mm)),  # an int32 column index per value
        # sparselm's C++ kernels: a 16-bit column index per value (fp32/bf16 values, or int8 with a scale per row)
        Kernel("csr16", 2, build_csr16, csr16_mm, native=True, max_columns=MAX_CSR16_COLUMNS),
        Kernel("csr16-int8", 2, build_csr16_int8, csr16_mm, native=True, max_columns=MAX_CSR16_COLUMNS),
        Kernel("bitmap", 0, build_bitmap, bitmap_mm, index_bytes_per_weight=1 / 8, native=True),  # a bit per weight
        Kernel("bitmap-int8", 0, build_bitmap_int8, bitmap_mm, index_bytes_per_weight=1 / 8, native=True),
        Kernel("dense-int8", 0, build_dense_int8, any_rank(dense_int8_mm)),  # torch's weight-only int8 GEMM
        # dense int8 × dynamically quantised activations
        Kernel("dense-w8a8", 0, build_dense_w8a8, any_rank(dense_w8a8_mm)),
        *(Kernel(f"bsr{b}", 8 / b**2, bsr_builder(b), any_rank(feature_major_mm)) for b in BLOCK_SIZES),  # int64/tile
        # a 2-bit position per kept value
        Kernel("semi-structured", 0.25, build_semi_structured, any_rank(semi_structured_mm)),
    )
}


def tile_occupancy(keep: torch.Tensor, block: int) -> torch.Tensor | None:
    """Per block × block tile: whether it holds any kept weight (None when the shape does not tile)."""
    rows, cols = keep.shape
    if rows % block or cols % block:
        return None
    return keep.reshape(rows // block, block, cols // block, block).any(dim=3).any(dim=1)


def block_sizes_of(keep: torch.Tensor) -> list[int]:
    """Block sizes whose tiles the mask is made of: the kept weights fill few tiles, and most zeros lie in empty
    tiles (so BSR stores almost no explicit zeros)."""
    density = float(keep.count_nonzero()) / keep.numel()
    if not 0 < density < 1:
        return []
    found = []
    for block in BLOCK_SIZES:
        tiles = tile_occupancy(keep, block)
        if tiles is None:
            continue
        occupied = float(tiles.count_nonzero()) / tiles.numel()
        if occupied <= density * BLOCK_SLACK and 1 - occupied >= 0.5 * (1 - density):
            found.append(block)
    return found


def is_two_four(keep: torch.Tensor) -> bool:
    return is_n_of_m(keep, 2, 4)


def cpu_candidates(blocks: list[int]) -> list[str]:
    """torch's CPU kernels worth measuring: CSR always, BSR at the block sizes the mask is made of (largest first)."""
    return ["csr", *(f"bsr{b}" for b in blocks)]


def kernel_fits(weight: torch.Tensor, kernel: str) -> bool:
    """Whether `kernel` can run this weight here: its indices address the weight's columns, and a native kernel
    needs sparselm's C++ extension loaded."""
    of = KERNELS[kernel]
    if of.max_columns is not None and weight.shape[1] > of.max_columns:
        return False
    return not of.native or extension.status().available


def require_cuda(kernel: str) -> None:
    if not torch.cuda.is_available():
        raise SparselmError(
            f"the {kernel} kernel (2:4 semi-structured sparsity) needs a CUDA GPU and none is available; "
            "on CPU use policy 'auto' (CSR/BSR kernels)"
        )
