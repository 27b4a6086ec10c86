"""Storage and runtime on the two embedded models (real weights): every codec round-trips, packed dirs load."""

from __future__ import annotations

import pytest
import torch

from sparselm import models
from sparselm.runtime import accelerate
from sparselm.storage import get_codec, pack, unpack
from sparselm.storage.zstd import compress_parts, decompress_parts
from sparselm.weights import select_matrices
from test_storage import prune_smallest, tensors_of

pytestmark = pytest.mark.slow
CODECS = ["bitmask", "csr", "rice", "compressed-tensors"]


def round_trips(w: torch.Tensor) -> None:
    """Every codec (with zstd where it applies) gives back the exact bits, in a fraction of the dense bytes."""
    for name in CODECS:
        codec = get_codec(name)
        encoded = compress_parts(codec.encode(w)) if name != "compressed-tensors" else codec.encode(w)
        assert torch.equal(codec.decode(decompress_parts(encoded)).view(torch.int32), w.view(torch.int32))
        assert encoded.nbytes < w.numel() * w.element_size() / 4


@pytest.mark.parametrize("fmt", ["auto", "compressed-tensors"])
def test_minilm_every_codec_and_pack_round_trip(tmp_path, fmt):
    model = prune_smallest(models.load("minilm-l6"), 0.9)
    if fmt == "auto":
        for m in select_matrices(model):
            round_trips(m.weight().contiguous())
    model.save_pretrained(tmp_path / "src")
    summary = pack(tmp_path / "src", tmp_path / "p", format=fmt)
    assert summary.sizes.gain and summary.file_bytes_packed < summary.file_bytes_dense
    unpack(tmp_path / "p", tmp_path / "d")
    original, restored = tensors_of(tmp_path / "src"), tensors_of(tmp_path / "d")
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


def test_smollm2_matrices_round_trip_through_every_codec():
    model = prune_smallest(models.load("smollm2-135m"), 0.95)
    block = [m for m in select_matrices(model) if m.block == 7]
    assert len(block) == 7
    for m in block:
        round_trips(m.weight().contiguous())


def test_smollm2_packed_loads_and_runs_accelerated(tmp_path):
    src = tmp_path / "src"
    prune_smallest(models.load("smollm2-135m"), 0.9).save_pretrained(src)
    summary = pack(src, tmp_path / "p", dtype="bf16")
    assert summary.sizes.packed_bytes < summary.sizes.dense_bytes / 3  # the 49152×576 embedding stays dense
    model = models.load(str(tmp_path / "p"))
    reference = models.load(str(src))
    ids = torch.randint(3, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(input_ids=ids, logits_to_keep=1).logits
    expected_state = {k: v.bfloat16().float() for k, v in reference.state_dict().items() if v.is_floating_point()}
    assert all(torch.equal(v, expected_state[k]) for k, v in model.state_dict().items() if k in expected_state)
    accelerate(reference, policy="sparse")
    with torch.inference_mode():
        assert torch.allclose(reference(input_ids=ids, logits_to_keep=1).logits, expected, atol=1e-3, rtol=1e-4)
