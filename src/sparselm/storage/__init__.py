"""Sparse storage: codecs (tensor ⇄ named parts), file layouts (sparselm's own, compressed-tensors), pack/unpack of
model directories, and opening a packed directory as a model without a dense copy."""

from . import bitmask, csr, int8, rice, sparse_bitmask  # noqa: F401  (register the codecs)
from . import compressed_tensors  # noqa: F401  (register the compressed-tensors layout)
from .codecs import CODECS, Encoded, get_codec
from .layouts import LAYOUTS
from .loading import model_from_packed, packed_config
from .pack import (
    FORMATS, MANIFEST, PackedSizes, PackSummary, UnpackSummary, is_packed, load_state_dict, pack, read_manifest, unpack,
)

__all__ = [
    "CODECS",
    "Encoded",
    "FORMATS",
    "LAYOUTS",
    "MANIFEST",
    "PackSummary",
    "PackedSizes",
    "UnpackSummary",
    "get_codec",
    "is_packed",
    "load_state_dict",
    "model_from_packed",
    "pack",
    "packed_config",
    "read_manifest",
    "unpack",
]
