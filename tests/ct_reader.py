"""Run by tests/test_storage_compressed_tensors.py with the interpreter of .venv-ct (transformers 4.52.4,
compressed-tensors 0.12.2): reads directories packed with `--format compressed-tensors` the two ways that package
offers, and writes what it read for the test to compare. Not a test module; imports nothing from sparselm.

Usage: python ct_reader.py JOBS.json, where JOBS.json lists {"packed", "dense", "out"} directories. Per job, `out`
receives `hf.safetensors` (state dict from transformers' from_pretrained of the packed directory),
`ct.safetensors` (a model built from config, filled by ModelCompressor.decompress) and `logits.safetensors`
(`reference`, `hf`, `ct`: logits of a fixed batch from the dense directory and from both readings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits.contiguous()


def read(packed: str, dense: str, out: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=torch.float32)
    via_hf = AutoModelForCausalLM.from_pretrained(packed, torch_dtype=torch.float32)
    via_ct = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(packed), torch_dtype=torch.float32)
    ModelCompressor.from_pretrained(packed).decompress(model_path=packed, model=via_ct)
    via_ct.tie_weights()  # decompress puts new Parameters in place, which unties a tied head (from_pretrained re-ties)
    ids = torch.randint(3, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_of(via_hf), str(out / "hf.safetensors"))
    save_file(state_of(via_ct), str(out / "ct.safetensors"))
    logits = {"reference": logits_of(reference, ids), "hf": logits_of(via_hf, ids), "ct": logits_of(via_ct, ids)}
    save_file(logits, str(out / "logits.safetensors"))


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        read(job["packed"], job["dense"], Path(job["out"]))
