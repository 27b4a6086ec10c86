"""Opening a packed directory as a model: built from its config with empty (meta) weights, then each decoded tensor
put in place as it comes.

Nothing is written to disk, no dense state dict is gathered and no tensor is copied into a second one: peak memory
is the model plus one tensor being decoded (and its coded parts). Checkpoint names are matched to the model as `from_pretrained` matches them for the common
case of a head or base class other than the one saved (the base model prefix added or dropped); checkpoint tensors
the model has no place for are skipped, and model tensors the checkpoint lacks keep their initialisation, as with
`from_pretrained`.
"""

from __future__ import annotations

import ctypes
import json
import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparselmError
from .pack import iter_decoded, source_config_text

GENERATION_CONFIG = "generation_config.json"


def packed_config(path: Path, manifest: dict[str, Any]) -> Any:
    """The source model's transformers config, rebuilt from the text kept in the manifest."""
    from transformers import CONFIG_MAPPING

    config = json.loads(source_config_text(path, manifest))
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise SparselmError(
            f"'{path}' holds a '{model_type}' model, which this transformers does not know; unpack it "
            "(sparselm unpack) and load the dense directory with the code it needs"
        )
    built = CONFIG_MAPPING[model_type].from_dict(config)
    built.name_or_path = str(path)
    return built


def model_from_packed(
    path: Path, manifest: dict[str, Any], cls: Any, config: Any, dtype: torch.dtype, **model_kwargs: Any
) -> nn.Module:
    """An instance of `cls` (a model class or a transformers Auto class) holding the packed directory's weights."""
    from accelerate import init_empty_weights

    build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=dtype, **model_kwargs)
    fill(model, path, manifest)
    model.tie_weights()  # as from_pretrained does: built with empty weights, tied heads are tied only now
    initialise_missing(model)
    if model.can_generate() and (path / GENERATION_CONFIG).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


@cache
def heap_trimmer() -> Callable[[int], int]:
    """glibc's `malloc_trim(0)`, or a no-op where the C library is not glibc.

    After the first large free glibc raises its mmap threshold, so later decode buffers come from the heap and, once
    freed, stay there between the long-lived weights: without trimming, a load peaks far above the dense model.
    """
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            return ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass
    return lambda *_: 0


def fill(model: nn.Module, path: Path, manifest: dict[str, Any]) -> None:
    """Put each decoded tensor in place of the (meta) parameter or buffer of the same name, cast to its dtype.

    Tied parameters share one Parameter object: the decoded tensor goes to every name of that object, so ties hold.
    """
    state = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for key, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(key)
    prefix = getattr(model, "base_model_prefix", "")
    for _, name, tensor in iter_decoded(path, manifest):
        key = model_key(name, state, prefix)
        if key is None:
            continue
        old = state[key]
        if old.shape != tensor.shape:
            raise SparselmError(
                f"'{name}' in '{path}' has shape {list(tensor.shape)} but the model expects {list(old.shape)}; "
                "the config does not match the weights, re-pack the model"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(old.dtype)
        new = nn.Parameter(tensor, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else tensor
        new._is_hf_initialized = True  # transformers' weight initialisation leaves it alone
        for tied in names_of[id(old)]:
            place(model, tied, new)
        heap_trimmer()(0)  # give this tensor's freed decode buffers back before the next one is decoded


def place(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    slots = module._parameters if attr in module._parameters else module._buffers
    slots[attr] = tensor


def initialise_missing(model: nn.Module) -> None:
    """Model tensors the checkpoint lacks (still on the meta device) get the model's own initialisation, as
    `from_pretrained` gives them; loaded tensors carry `_is_hf_initialized` and are skipped."""
    state = model.state_dict(keep_vars=True)
    missing = {id(t): (key, t) for key, t in state.items() if t.is_meta}
    if not missing:
        return
    names_of: dict[int, list[str]] = {}
    for key, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(key)
    for ident, (key, old) in missing.items():
        empty = torch.empty(old.shape, dtype=old.dtype)
        new = nn.Parameter(empty, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else empty
        for tied in names_of[ident]:
            place(model, tied, new)
    model.initialize_weights()


def model_key(name: str, keys: dict[str, Any], prefix: str) -> str | None:
    """The model's name for checkpoint tensor `name`: as is, with the base model prefix added, or with it dropped."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in keys), None)
