"""Opening a packed directory as a model: built from its config, then filled tensor by tensor as each is decoded.

Nothing is written to disk and no dense state dict is gathered: peak memory is the model plus one decoded tensor
(and its coded parts). Checkpoint names are matched to the model as `from_pretrained` matches them for the common
case of a head or base class other than the one saved (the base model prefix added or dropped); checkpoint tensors
the model has no place for are skipped, and model tensors the checkpoint lacks keep their initialisation, as with
`from_pretrained`.
"""

from __future__ import annotations

import json
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
    build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
    model = build(config, dtype=dtype, **model_kwargs)
    fill(model, path, manifest)
    if model.can_generate() and (path / GENERATION_CONFIG).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def fill(model: nn.Module, path: Path, manifest: dict[str, Any]) -> None:
    """Copy every decoded tensor into the model's parameter or buffer of the same name (cast to its dtype)."""
    targets = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    with torch.no_grad():
        for _, name, tensor in iter_decoded(path, manifest):
            key = model_key(name, targets, prefix)
            if key is None:
                continue
            if targets[key].shape != tensor.shape:
                raise SparselmError(
                    f"'{name}' in '{path}' has shape {list(tensor.shape)} but the model expects "
                    f"{list(targets[key].shape)}; the config does not match the weights, re-pack the model"
                )
            targets[key].copy_(tensor)


def model_key(name: str, keys: dict[str, Any], prefix: str) -> str | None:
    """The model's name for checkpoint tensor `name`: as is, with the base model prefix added, or with it dropped."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in keys), None)
