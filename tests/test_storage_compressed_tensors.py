"""`pack --format compressed-tensors` read by compressed-tensors itself: its ModelCompressor.decompress and
transformers' from_pretrained, at the last releases that read sparse-bitmask (the .venv-ct environment that
`make setup-ct` builds; tests/ct_reader.py runs there)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparselm.storage import pack
from test_storage import pruned_dir, same_bits, tensors_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".venv-ct" / "bin" / "python"
FAMILIES = ["llama", "gpt2"]  # gpt2: Conv1D weights, stored transposed relative to nn.Linear


def ct_python() -> Path:
    """The .venv-ct interpreter; skipped without it on a developer machine, a failure under CI."""
    if CT_PYTHON.is_file():
        return CT_PYTHON
    message = f"{CT_PYTHON} is missing: build it with `make setup-ct` (make test does)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def test_compressed_tensors_and_transformers_4_read_the_packed_weights_bit_exactly(tmp_path):
    python = ct_python()
    jobs = []
    for family in FAMILIES:
        src = pruned_dir(tmp_path, family)
        pack(src, tmp_path / f"{family}-ct", format="compressed-tensors")
        jobs.append({"family": family, "packed": str(tmp_path / f"{family}-ct"), "dense": str(src),
                     "out": str(tmp_path / f"{family}-read")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [str(python), str(ROOT / "tests" / "ct_reader.py"), str(tmp_path / "jobs.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for job in jobs:
        original = tensors_of(Path(job["dense"]))
        out = Path(job["out"])
        for reader in ("hf", "ct"):
            state = load_file(out / f"{reader}.safetensors")
            assert set(original) <= set(state), (job["family"], reader)
            differing = [k for k in original if not same_bits(state[k], original[k])]
            assert differing == [], (job["family"], reader, differing[:5])
        logits = load_file(out / "logits.safetensors")
        assert logits["reference"].abs().sum() > 0
        assert same_bits(logits["hf"], logits["reference"]) and same_bits(logits["ct"], logits["reference"])
