"""Weight-only int8 storage (`sparselm pack --dtype int8`, the `int8` codec): pruned positions stay exactly zero, the
int8 values and scales come back from the packed file bit for bit, and the block matrices of Conv1D models are
quantised per output channel (their columns), everything else stays as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import tiny_model
from sparselm import models
from sparselm.cli import app
from sparselm.storage import Encoded, get_codec, pack, unpack
from sparselm.storage.int8 import dequantize_rows, quantize_rows
from sparselm.storage.zstd import decompress_parts
from sparselm.weights import select_matrices
from test_storage import prune_smallest, same_bits, tensors_of

runner = CliRunner()


def stored_int8(packed, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values and scales of tensor `name` as they lie in the packed file."""
    manifest = json.loads((packed / "sparselm-pack.json").read_text())
    info = manifest["tensors"][name]
    assert info["codec"] == "int8"
    with safe_open(str(packed / "model.packed.safetensors"), framework="pt") as fh:
        parts = {part: fh.get_tensor(key) for part, key in info["keys"].items()}
    encoded = decompress_parts(Encoded("int8", tuple(info["shape"]), torch.float32, parts, info["meta"]))
    return get_codec("int8").int8_parts(encoded)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.95])
def test_pack_int8_then_unpack_is_exact_for_values_and_scales(tmp_path, family, sparsity):
    model = prune_smallest(tiny_model(family), sparsity) if sparsity else tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    pack(tmp_path / "src", tmp_path / "packed", dtype="int8")
    unpack(tmp_path / "packed", tmp_path / "out")
    original, unpacked = tensors_of(tmp_path / "src"), tensors_of(tmp_path / "out")
    matrices = {m.name: m for m in select_matrices(model)}
    checkpoint_names = {n for n in original if any(n.endswith(m) for m in matrices)}
    assert checkpoint_names and len(checkpoint_names) == len(matrices)
    for name, tensor in original.items():
        if name not in checkpoint_names:
            assert same_bits(unpacked[name], tensor), name  # embeddings, norms, heads: untouched
            continue
        transposed = family == "gpt2"  # Conv1D stores in × out: output channels are columns
        out_in = tensor.t() if transposed else tensor
        q, scales = stored_int8(tmp_path / "packed", name)
        expected_q, expected_scales = quantize_rows(out_in)
        assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales)  # exact, bit for bit
        dequantised = dequantize_rows(q, scales)
        assert torch.equal(unpacked[name], dequantised.t() if transposed else dequantised)
        assert torch.all(unpacked[name][tensor == 0] == 0)  # pruned positions stay exactly zero
        step = scales[:, None].t() if transposed else scales[:, None]
        assert torch.all((unpacked[name] - tensor).abs() <= step / 2 + 1e-7)


def test_int8_packed_model_loads_and_repacks_to_the_same_int8(tmp_path):
    prune_smallest(tiny_model("opt"), 0.8).save_pretrained(tmp_path / "src")
    pack(tmp_path / "src", tmp_path / "packed", dtype="int8")
    loaded = models.load(str(tmp_path / "packed"))
    for matrix in select_matrices(loaded):
        q, scales = quantize_rows(matrix.weight())  # quantising the dequantised weights again changes nothing
        assert torch.equal(dequantize_rows(q, scales), matrix.weight())


def test_cli_pack_int8_json_and_refusals(tmp_path):
    prune_smallest(tiny_model("llama"), 0.9).save_pretrained(tmp_path / "src")
    result = runner.invoke(app, ["pack", str(tmp_path / "src"), "--out", str(tmp_path / "p"), "--dtype", "int8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "int8" and {"int8", "int8+zstd"} & set(summary["codecs"])
    refused = runner.invoke(app, ["pack", str(tmp_path / "src"), "--out", str(tmp_path / "ct"), "--dtype", "int8",
                                  "--format", "compressed-tensors"])
    assert refused.exit_code != 0 and "sparselm's own layout" in " ".join(refused.output.split())
    assert not (tmp_path / "ct").exists()
