"""The compressed-tensors `sparse-bitmask` layout (Neural Magic / vLLM), so llm-compressor and vLLM users can read it.

Per 2-D weight `W` the safetensors file holds `W.shape` (int64 [rows, cols]), `W.compressed` (1-D kept values in
row-major order), `W.bitmask` (uint8, rows × ceil(cols/8), numpy `packbits` little-endian per row) and
`W.row_offsets` (int64, where each row starts in `compressed`); config.json carries a `quantization_config` with a
`sparsity_config` of format `sparse-bitmask`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..masks import is_n_of_m
from .codecs import Encoded, keep_mask, register

NAME = "compressed-tensors"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
FORMAT = "sparse-bitmask"


@register
class CompressedTensorsBitmask:
    name = NAME

    def applies(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() > 0

    def encode(self, tensor: torch.Tensor) -> Encoded:
        tensor = tensor.contiguous()
        keep = keep_mask(tensor)
        counts = keep.sum(dim=1)
        parts = {
            "shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
            "compressed": tensor[keep],
            "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        rows, cols = (int(x) for x in encoded.parts["shape"])
        bits = np.unpackbits(encoded.parts["bitmask"].numpy(), axis=-1, count=cols, bitorder="little")
        out = torch.zeros(rows, cols, dtype=encoded.dtype)
        out[torch.from_numpy(bits.astype(bool))] = encoded.parts["compressed"]
        return out


def sparsity_structure(tensors: list[torch.Tensor]) -> str:
    """'2:4' when every group of four consecutive inputs keeps at most two weights, else 'unstructured'."""
    return "2:4" if tensors and all(is_n_of_m(keep_mask(t), 2, 4) for t in tensors) else "unstructured"


def config_entry(targets: list[str], global_sparsity: float, structure: str) -> dict[str, Any]:
    """The `quantization_config` block of config.json that compressed-tensors readers look for."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:
        ct_version = "0.9.0"
    return {
        "quant_method": "compressed-tensors",
        "version": ct_version,
        "format": "dense",
        "sparsity_config": {
            "format": FORMAT,
            "global_sparsity": global_sparsity,
            "sparsity_structure": structure,
            "targets": targets,
            "ignore": [],
        },
    }
