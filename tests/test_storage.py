"""Pack/unpack of model directories: bit-exact, loadable, checksummed, readable by compressed-tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from sparselm import models, sources
from sparselm.errors import SparselmError
from sparselm.io import MARKER_DIR
from sparselm.storage import MANIFEST, is_packed, load_state_dict, pack, read_manifest, unpack
from sparselm.weights import select_matrices

FORMATS = ["auto", "bitmask", "csr", "rice", "compressed-tensors"]


def prune_smallest(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Test-only pruning: zero the smallest |w| of each prunable matrix."""
    for m in select_matrices(model):
        w = m.weight()
        k = int(w.numel() * sparsity)
        if k:
            w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    return model


def pruned_dir(tmp_path: Path, family: str, sparsity: float = 0.9) -> Path:
    out = tmp_path / f"{family}-pruned"
    prune_smallest(tiny_model(family), sparsity).save_pretrained(out)
    sources.write_provenance(out, sources.ModelSource(name=family, path=out, quantized_from="test-quant"))
    return out


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_unpack_bit_exact_for_every_family(tmp_path, family, fmt):
    src = pruned_dir(tmp_path, family)
    summary = pack(src, tmp_path / "packed", format=fmt)
    assert summary.sizes.gain and summary.sizes.packed_bytes < summary.sizes.dense_bytes / 2
    assert summary.sizes.sparse_tensors >= len(select_matrices(tiny_model(family)))
    assert is_packed(tmp_path / "packed") and not is_packed(src)
    unpack(tmp_path / "packed", tmp_path / "dense")
    original, restored = tensors_of(src), tensors_of(tmp_path / "dense")
    assert original.keys() == restored.keys()
    assert all(same_bits(original[k], restored[k]) for k in original)
    assert json.loads((tmp_path / "dense" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_load_opens_a_packed_directory_as_a_normal_model(tmp_path, family):
    src = pruned_dir(tmp_path, family)
    pack(src, tmp_path / "packed")
    model, source = models.load_with_source(str(tmp_path / "packed"))
    reference = models.load(str(src))
    assert type(model) is type(reference) and source.quantized_from == "test-quant"
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert sources.read_provenance(tmp_path / "packed")["packed"] == {"format": "auto", "dtype": "keep"}


def test_compressed_tensors_package_decompresses_our_output(tmp_path):
    from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    from compressed_tensors.utils import get_nested_weight_mappings, unpack_bitmasks

    src = pruned_dir(tmp_path, "llama")
    out = tmp_path / "ct"
    pack(src, out, format="compressed-tensors")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    sparsity = SparsityCompressionConfig.load_from_registry(
        qconfig["sparsity_config"]["format"], **qconfig["sparsity_config"]
    )
    assert sparsity.format == CompressionFormat.sparse_bitmask.value and sparsity.global_sparsity > 0.85
    nested, unmatched = get_nested_weight_mappings(
        str(out), ["shape", "compressed", "bitmask", "row_offsets"], return_unmatched_params=True
    )
    original = tensors_of(src)
    # compressed-tensors keys the parts by module (`X.bitmask` for `X.weight`), as its decompressor expects
    assert {f"{n}.weight" for n in nested} | set(unmatched) == set(original)
    assert set(nested) == set(sparsity.targets) and not any(n.endswith(".weight") for n in nested)
    assert "format" not in qconfig
    stored = load_file(out / "model.safetensors")
    for name, parts in nested.items():
        assert set(parts) == {"shape", "compressed", "bitmask", "row_offsets"}
        shape = stored[f"{name}.shape"].tolist()
        keep = unpack_bitmasks(stored[f"{name}.bitmask"], shape)
        dense = torch.zeros(shape, dtype=stored[f"{name}.compressed"].dtype)
        dense[keep] = stored[f"{name}.compressed"]
        assert torch.equal(dense, original[f"{name}.weight"])
        counts = keep.sum(dim=1)
        assert torch.equal(stored[f"{name}.row_offsets"], torch.cumsum(counts, 0) - counts)
    assert all(torch.equal(stored[n], original[n]) for n in unmatched)


def test_two_four_structure_is_declared_for_compressed_tensors(tmp_path):
    model = tiny_model("opt")
    for m in select_matrices(model):
        w = m.weight().reshape(-1, 4)
        drop = w.abs().argsort(dim=1)[:, :2]
        w.scatter_(1, drop, 0.0)
    model.save_pretrained(tmp_path / "src")
    pack(tmp_path / "src", tmp_path / "ct", format="compressed-tensors")
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qconfig["sparsity_config"]["sparsity_structure"] == "2:4"


def test_dtype_option_stores_half_values(tmp_path):
    src = pruned_dir(tmp_path, "gpt2")
    pack(src, tmp_path / "p16", dtype="fp16")
    state = load_state_dict(tmp_path / "p16")
    original = tensors_of(src)
    assert all(state[k].dtype == torch.float16 for k in original if original[k].is_floating_point())
    assert all(torch.equal(state[k], original[k].half()) for k in original if original[k].is_floating_point())


def test_packing_a_dense_model_works_and_says_it_gains_nothing(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "dense")
    summary = pack(tmp_path / "dense", tmp_path / "packed")
    assert not summary.sizes.gain and summary.sizes.sparse_tensors == 0
    assert "gains nothing" in summary.sizes.message
    assert models.load(str(tmp_path / "packed")) is not None


def test_corrupt_file_is_named_and_nothing_is_written(tmp_path):
    src = pruned_dir(tmp_path, "llama")
    pack(src, tmp_path / "packed")
    weights = tmp_path / "packed" / "model.packed.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SparselmError, match=r"checksum mismatch in '.*model\.packed\.safetensors'"):
        unpack(tmp_path / "packed", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_truncated_and_missing_files_are_named(tmp_path):
    src = pruned_dir(tmp_path, "gpt2")
    pack(src, tmp_path / "packed")
    config = tmp_path / "packed" / "config.json"
    intact = config.read_bytes()
    config.write_bytes(intact[:10])
    with pytest.raises(SparselmError, match=r"checksum mismatch in '.*config\.json'.*corrupt or truncated"):
        read_manifest(tmp_path / "packed")
    config.write_bytes(intact)
    (tmp_path / "packed" / "model.packed.safetensors").unlink()
    with pytest.raises(SparselmError, match=r"model\.packed\.safetensors' is missing"):
        models.load(str(tmp_path / "packed"))


def test_unknown_format_version_is_a_clear_error(tmp_path):
    src = pruned_dir(tmp_path, "bert")
    pack(src, tmp_path / "packed")
    manifest_path = tmp_path / "packed" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SparselmError, match="format version 99.*reads version 1"):
        unpack(tmp_path / "packed", tmp_path / "out")
    manifest_path.write_text("{not json")
    with pytest.raises(SparselmError, match="corrupt"):
        read_manifest(tmp_path / "packed")


def test_bad_sources_are_refused(tmp_path):
    src = pruned_dir(tmp_path, "gpt2")
    pack(src, tmp_path / "packed")
    with pytest.raises(SparselmError, match="already packed"):
        pack(tmp_path / "packed", tmp_path / "again")
    with pytest.raises(SparselmError, match="unknown pack format"):
        pack(src, tmp_path / "x", format="zip")
    with pytest.raises(SparselmError, match="unknown --dtype"):
        pack(src, tmp_path / "x", dtype="int4")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(SparselmError, match="pickle weight files; sparselm packs safetensors only"):
        pack(pickled, tmp_path / "x")
    with pytest.raises(SparselmError, match="not a packed sparselm directory"):
        unpack(src, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_sharded_source_round_trips(tmp_path):
    model = prune_smallest(tiny_model("llama"), 0.8)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    pack(tmp_path / "src", tmp_path / "packed")
    unpack(tmp_path / "packed", tmp_path / "dense")
    names = sorted(p.name for p in (tmp_path / "src").iterdir())
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == sorted([*names, "provenance.json", MARKER_DIR])
    original, restored = tensors_of(tmp_path / "src"), tensors_of(tmp_path / "dense")
    assert all(same_bits(original[k], restored[k]) for k in original)
    assert models.load(str(tmp_path / "dense")) is not None


SPARSELM_LAYOUT_FORMATS = ["auto", "bitmask", "csr", "rice"]


@pytest.mark.parametrize("fmt", SPARSELM_LAYOUT_FORMATS)
def test_transformers_refuses_a_packed_directory_naming_the_way_out(tmp_path, fmt):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = pruned_dir(tmp_path, "gpt2")
    pack(src, tmp_path / "packed", format=fmt)
    with pytest.raises(ValueError, match=r"packed by sparselm.*sparselm unpack.*sparselm\.load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    assert AutoConfig.from_pretrained(tmp_path / "packed").model_type == "gpt2"  # configs and tokenizers still read


@pytest.mark.parametrize("fmt", ["auto", "compressed-tensors"])
def test_unpack_restores_config_json_byte_for_byte(tmp_path, fmt):
    src = pruned_dir(tmp_path, "llama")
    original = (src / "config.json").read_bytes()
    pack(src, tmp_path / "packed", format=fmt)
    assert (tmp_path / "packed" / "config.json").read_bytes() != original
    unpack(tmp_path / "packed", tmp_path / "dense")
    assert (tmp_path / "dense" / "config.json").read_bytes() == original


def test_version_1_directories_still_unpack_and_load(tmp_path):
    """A compressed-tensors directory as sparselm 0.1 wrote it: manifest version 1, no source_config, and config.json
    with the quantization_config that unpacking drops."""
    from sparselm.storage.pack import sha256_of

    src = pruned_dir(tmp_path, "opt")
    packed = tmp_path / "packed"
    pack(src, packed, format="compressed-tensors")
    manifest = json.loads((packed / MANIFEST).read_text())
    del manifest["source_config"]
    manifest["version"] = 1
    config = packed / "config.json"
    config.write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                  "quantization_config": {"quant_method": "compressed-tensors"}}))
    manifest["files"]["config.json"] = {"sha256": sha256_of(config), "bytes": config.stat().st_size}
    (packed / MANIFEST).write_text(json.dumps(manifest))
    unpack(packed, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    original, restored = tensors_of(src), tensors_of(tmp_path / "dense")
    assert all(same_bits(original[k], restored[k]) for k in original)
    reference = models.load(str(src)).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in models.load(str(packed)).state_dict().items())
