"""Sparse storage: codecs (dense, bitmask, csr, rice, compressed-tensors) and pack/unpack of model directories."""

from .codecs import CODECS, Encoded, get_codec
from .pack import FORMATS, MANIFEST, is_packed, load_state_dict, pack, read_manifest, unpack, unpacked

__all__ = [
    "CODECS",
    "Encoded",
    "FORMATS",
    "MANIFEST",
    "get_codec",
    "is_packed",
    "load_state_dict",
    "pack",
    "read_manifest",
    "unpack",
    "unpacked",
]
