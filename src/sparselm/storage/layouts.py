"""File layouts of a packed directory, apart from the codecs that code each tensor.

A layout decides which file holds the coded weights, the safetensors key of each coded part, which pack formats it
serves (and the codecs each format tries), and what config.json gains: the entries other tools read, or an entry
that makes `transformers` refuse the directory loudly instead of loading it with random weights. A codec never sees
any of this. Adding a layout is one class registered with `@register_layout`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import SparselmError

# transformers (4.5x and 5.x) reads `transformers_weights` from config.json as the name of the weights file and
# refuses any name that is not a safetensors file, quoting it: so the name is the instruction.
REFUSAL = (
    "packed by sparselm, so transformers cannot read this directory: run `sparselm unpack <this directory> --out "
    "<dense directory>` first, or load it with sparselm.load('<this directory>')"
)


class Layout(Protocol):
    name: str
    weights_file: str
    formats: dict[str, tuple[str, ...]]
    zstd: bool
    config_keys: tuple[str, ...]  # the top-level config.json keys that config_entries adds

    def codes(self, name: str) -> bool:
        """Whether tensor `name` may be stored coded (else it stays dense under its own name)."""
        ...

    def part_key(self, name: str, part: str) -> str:
        """The safetensors key of one coded part of tensor `name`."""
        ...

    def config_entries(
        self, config: dict[str, Any], tensors: dict[str, dict[str, Any]], stored: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Entries to add to config.json, from the manifest entries of the tensors and the stored parts."""
        ...


LAYOUTS: dict[str, Layout] = {}


def register_layout(cls: type) -> type:
    layout = cls()
    LAYOUTS[layout.name] = layout
    return cls


def layout_of_format(format: str) -> Layout:
    for layout in LAYOUTS.values():
        if format in layout.formats:
            return layout
    raise SparselmError(f"unknown pack format '{format}'; choose one of: {', '.join(all_formats())}")


def all_formats() -> dict[str, tuple[str, ...]]:
    """Every pack format with the codecs it tries, over all layouts."""
    return {fmt: codecs for layout in LAYOUTS.values() for fmt, codecs in layout.formats.items()}


@register_layout
class SparselmLayout:
    """sparselm's own layout: parts keyed `name:part` in one file that only sparselm reads; zstd where it pays."""

    name = "sparselm"
    weights_file = "model.packed.safetensors"
    formats = {
        "auto": ("bitmask", "csr", "rice"),
        "bitmask": ("bitmask",),
        "csr": ("csr",),
        "rice": ("rice",),
    }
    zstd = True
    config_keys = ("transformers_weights",)

    def codes(self, name: str) -> bool:
        return True

    def part_key(self, name: str, part: str) -> str:
        return f"{name}:{part}"

    def config_entries(
        self, config: dict[str, Any], tensors: dict[str, dict[str, Any]], stored: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {"transformers_weights": REFUSAL}
