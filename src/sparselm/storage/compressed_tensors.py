"""The compressed-tensors `sparse-bitmask` layout, as compressed-tensors ≤0.12 and transformers 4.5x read it.

Per coded weight `X.weight` the file `model.safetensors` holds `X.shape`, `X.compressed`, `X.bitmask` and
`X.row_offsets` (the `.weight` suffix dropped, as compressed-tensors' readers expect; see `sparse_bitmask.py` for
the parts); every other tensor is stored dense under its own name. config.json gains a `quantization_config` with
`quant_method`, `version` and a `sparsity_config` and nothing else (a top-level `format` makes compressed-tensors
0.12 look for a quantisation scheme and fail). compressed-tensors 0.20, llm-compressor and transformers 5 dropped
the sparse compressors: transformers 5 loads such a directory with the coded matrices left random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SparselmError
from ..masks import is_n_of_m
from .layouts import register_layout
from .sparse_bitmask import NAME as SPARSE_BITMASK

# The compressed-tensors release whose sparse-bitmask reader this layout follows (the last one that has it).
WRITTEN_FOR = "0.12.2"
WEIGHT_SUFFIX = ".weight"


@register_layout
class CompressedTensorsLayout:
    name = "compressed-tensors"
    weights_file = "model.safetensors"
    formats = {"compressed-tensors": (SPARSE_BITMASK,)}
    zstd = False
    config_keys = ("quantization_config",)

    def codes(self, name: str) -> bool:
        return name.endswith(WEIGHT_SUFFIX)

    def part_key(self, name: str, part: str) -> str:
        return f"{name.removesuffix(WEIGHT_SUFFIX)}.{part}"

    def config_entries(
        self, config: dict[str, Any], tensors: dict[str, dict[str, Any]], stored: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if "quantization_config" in config:
            raise SparselmError(
                "the model already has a quantization_config; compressed-tensors packing needs a plain model"
            )
        coded = {n: t for n, t in tensors.items() if t["codec"] == SPARSE_BITMASK}
        numel = sum(t["numel"] for t in coded.values())
        zeros = sum(t["zeros"] for t in coded.values())
        masks = [stored[t["keys"]["bitmask"]] for t in coded.values()]
        columns = [t["shape"][1] for t in coded.values()]
        return {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "version": WRITTEN_FOR,
                "sparsity_config": {
                    "format": SPARSE_BITMASK,
                    "global_sparsity": zeros / numel if numel else 0.0,
                    "sparsity_structure": sparsity_structure(masks, columns),
                    "targets": sorted(n.removesuffix(WEIGHT_SUFFIX) for n in coded),
                    "ignore": [],
                },
            }
        }


def sparsity_structure(row_bitmasks: list[torch.Tensor], columns: list[int]) -> str:
    """'2:4' when every group of four consecutive inputs keeps at most two weights, else 'unstructured'."""
    def keeps(packed: torch.Tensor, cols: int) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))

    if not all(is_n_of_m(keeps(packed, cols), 2, 4) for packed, cols in zip(row_bitmasks, columns)):
        return "unstructured"
    return "2:4" if row_bitmasks else "unstructured"
