"""sparselm's C++ sparse kernels (runtime.extension, runtime.kernels' csr16 family and bitmap) against dense products.

Every format (CSR16, bitmap) × value dtype (fp32, bf16, int8 with per-row scales) × activation dtype (fp32,
bf16) × CPU code path this machine can run (portable, AVX2+FMA, AVX-512F, AVX-512 with bf16 dot products; the others
are skipped with the reason) × token count (the SpMV for 1 token, the SpMM's vector, chunk and scalar tails otherwise)
equals the float64 product of the same matrix, on random shapes with empty rows and empty columns and widths that
are not whole 32-column blocks. Tolerances: 1e-5 of the largest output with fp32 activations (fp32 accumulation),
1e-2 with bf16 activations (the output is rounded to bf16: 2^-8 relative).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from sparselm.errors import SparselmError
from sparselm.runtime import accelerate, extension
from sparselm.runtime.kernels import (
    KERNELS,
    build_bitmap,
    build_csr16,
    build_dense_int8,
    csr16_mm,
    dense_int8_mm,
)
from sparselm.runtime.modules import SparseLinear
from sparselm.storage.int8 import dequantize_rows, quantize_rows
from sparselm.weights import select_matrices
from test_storage import prune_smallest

VALUES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "int8": (torch.float32, True)}
FORMATS = {  # name: (build(weight, int8), the kernel's matmul)
    "csr16": (build_csr16, csr16_mm),
    "bitmap": (build_bitmap, KERNELS["bitmap"].matmul),
}
PATHS = ["portable", "avx2", "avx512", "avx512bf16"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TOKENS = [1, 2, 7, 8, 33, 64, 131]

needs_extension = pytest.mark.skipif(not extension.status().available, reason="sparselm's C++ kernels did not build")


def sparse_matrix(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    """Random weights at `density`, with row 1 and column 2 empty (and the last row/column empty when density is 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    w[1 % rows] = 0
    w[:, 2 % cols] = 0
    return w


def reference(csr, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ csr.to_dense().double().t()


def assert_close(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(float(expected.abs().max()), 1e-30)
    assert float((y.double() - expected).abs().max()) <= TOLERANCE[dtype] * scale


def path_or_skip(path: str) -> str:
    if path not in extension.supported_paths():
        pytest.skip(f"this CPU cannot run the {path} path (or the extension is absent)")
    return path


@needs_extension
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", list(FORMATS))
@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
def test_every_kernel_path_equals_the_dense_product(path, form, values, activations):
    path_or_skip(path)
    weight_dtype, int8 = VALUES[values]
    build, matmul = FORMATS[form]
    shapes = [(67, 300, 0.2), (5, 17, 0.5), (40, 33, 0.05), (9, 64, 0.0), (6, 700, 0.1)]
    for seed, (rows, cols, density) in enumerate(shapes):
        w = sparse_matrix(rows, cols, density, seed).to(weight_dtype)
        built = build(w, int8)
        assert built.values.dtype == (torch.int8 if int8 else weight_dtype)
        for tokens in TOKENS:
            x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(activations)
            y = matmul(built, x, path)
            assert y.shape == (tokens, rows) and y.dtype == activations
            assert_close(y, reference(built, x), activations)
            assert torch.all(y[:, 1 % rows] == 0)  # the empty row gives exact zeros, never leftover memory


@needs_extension
@pytest.mark.parametrize("density", [0.5, 0.97])
def test_bitmap_rows_dense_enough_to_fill_whole_blocks_take_the_vector_paths(density):
    """Rows with most of their 32-column blocks full (the expand and dot-product paths' common case), the last
    block partial, and bf16 values and activations as the bf16 path multiplies them; fp32 and int8 values alike."""
    w = sparse_matrix(130, 600, density, 7).to(torch.bfloat16)
    bitmap = build_bitmap(w)
    assert torch.equal(bitmap.to_dense(), w.float())
    x = torch.randn(1, 600).to(torch.bfloat16)
    for path in extension.supported_paths():
        assert_close(KERNELS["bitmap"].matmul(bitmap, x, path), reference(bitmap, x), torch.bfloat16)
        for wide in (build_bitmap(w.float()), build_bitmap(w.float(), int8=True)):
            assert_close(KERNELS["bitmap"].matmul(wide, x.float(), path), reference(wide, x.float()), torch.float32)


def test_bitmap_words_hold_all_32_columns_of_a_block():
    w = torch.zeros(2, 70)
    w[0, [0, 31, 32, 63, 64, 69]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    bitmap = build_bitmap(w)
    assert bitmap.masks.dtype == torch.int32 and bitmap.masks.shape == (2, 3)
    assert bitmap.masks[0, 0] == -(2**31) + 1  # bits 0 and 31: the sign bit is a column like any other
    assert bitmap.offsets.tolist() == [0, 6, 6] and bitmap.values[6:].eq(0).all() and len(bitmap.values) == 6 + 16
    assert torch.equal(bitmap.to_dense(), w)


@needs_extension
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("layout", ["token-major", "feature-major", "strided"])
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [50, 700])
def test_every_output_element_is_written_over_whatever_memory_held(tokens, layout, activations, width):
    w = sparse_matrix(23, width, 0.3, 0)
    csr, bitmap = build_csr16(w.to(activations)), build_bitmap(w.to(activations))  # bf16 values: the pair SpMM
    int8 = build_bitmap(w, int8=True)
    ops = torch.ops.sparselm_kernels
    x = torch.randn(tokens, width).to(activations)
    given = {"token-major": x, "feature-major": x.t().contiguous().t(), "strided": torch.stack([x, x], 2)[:, :, 0]}[layout]
    assert torch.equal(given, x)
    for built, write in (
        (csr, lambda out: ops.mm_out(csr.rowptr, csr.cols, csr.values, csr.scales, given, out, 0)),
        *(
            (b, lambda out, b=b: ops.bitmap_mm_out(b.masks, b.offsets, b.values, b.scales, given, out, 0))
            for b in (bitmap, int8)
        ),
    ):
        out = torch.full((23, tokens), float("nan"), dtype=activations)
        write(out)
        assert not out.isnan().any()
        assert_close(out.t(), reference(built, x), activations)


@needs_extension
@pytest.mark.parametrize("form", list(FORMATS))
def test_an_activation_outside_a_rows_columns_never_reaches_its_output(form):
    """The bf16 dot-product SpMM multiplies a row's stored values in pairs; an odd row's last value is paired with a
    zero value and zero activations, never with another column's activation (0 · inf would be NaN)."""
    w = torch.zeros(4, 40)
    w[0, [3, 9, 20]] = torch.tensor([1.0, -2.0, 0.5])  # odd: the last value has no partner
    w[2, [1]] = 3.0
    w[3, [0, 5, 6, 7, 39]] = 1.0
    built = FORMATS[form][0](w.to(torch.bfloat16), False)
    x = torch.randn(37, 40).to(torch.bfloat16)
    x[:, [2, 4, 38]] = float("inf")  # columns no row stores
    for path in extension.supported_paths():
        y = FORMATS[form][1](built, x, path)
        assert torch.isfinite(y).all()
        finite = x.clone()
        finite[:, [2, 4, 38]] = 0
        assert_close(y, finite.double() @ w.double().t(), torch.bfloat16)


@needs_extension
def test_sixteen_bit_column_indices_reach_beyond_32767():
    w = torch.zeros(3, 65536)
    w[0, [0, 32767, 32768, 65535]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[2, 50000] = -5.0
    csr = build_csr16(w)
    assert csr.cols.dtype == torch.int16 and torch.equal(csr.to_dense(), w)
    x = torch.randn(2, 65536)
    assert_close(csr16_mm(csr, x), x.double() @ w.double().t(), torch.float32)
    with pytest.raises(SparselmError, match="65536 input features"):
        build_csr16(torch.zeros(2, 65537))


def test_int8_keeps_zeros_zero_and_scales_per_output_row():
    w = sparse_matrix(31, 40, 0.4, 3)
    w[4] = 0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (31,)
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))  # pruned positions stay exactly zero
    nonempty = w.abs().amax(dim=1) > 0
    assert int(nonempty.sum()) == 29  # rows 1 and 4 are empty
    assert torch.equal(q.abs().amax(dim=1)[nonempty], torch.full((29,), 127, dtype=torch.int8))
    assert scales[4] == 1.0 and torch.equal(q[4], torch.zeros(40, dtype=torch.int8))
    error = (dequantize_rows(q, scales) - w).abs()
    assert torch.all(error <= scales[:, None] / 2 + 1e-7)  # round to nearest: at most half a step per row


def test_dense_int8_kernel_equals_the_dequantised_product():
    w = torch.randn(48, 64)
    x = torch.randn(5, 64)
    dense = build_dense_int8(w)
    expected = x.double() @ dequantize_rows(dense.values, dense.scales).double().t()
    assert_close(dense_int8_mm(dense, x), expected, torch.float32)


def test_a_forced_path_is_checked(monkeypatch):
    monkeypatch.setenv(extension.PATH_ENV, "sse9")
    with pytest.raises(SparselmError, match="not a kernel path"):
        extension.chosen_path()
    if extension.status().available:
        monkeypatch.setenv(extension.PATH_ENV, "portable")
        assert extension.chosen_path() == "portable"
        if "avx512" not in extension.supported_paths():
            monkeypatch.setenv(extension.PATH_ENV, "avx512")
            with pytest.raises(SparselmError, match="lacks the instructions"):
                extension.chosen_path()


def test_without_a_compiler_the_extension_is_absent_with_one_note(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path))  # no cached build to fall back on
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    status = extension.loaded.__wrapped__()
    assert not status.available and status.path == "torch"
    assert "unavailable" in status.note and "no-such-compiler" in status.note and "torch's kernels" in status.note
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_accelerate_degrades_to_torch_kernels_with_the_note(monkeypatch):
    note = "sparselm's C++ kernels are unavailable (test); using torch's kernels only"
    absent = extension.Status(False, "torch", note)
    monkeypatch.setattr(extension, "status", lambda: absent)
    model = prune_smallest(tiny_model("opt"), 0.9)
    x = torch.randint(0, 90, (1, 6))
    with torch.inference_mode():
        expected = model(x).logits
    report = accelerate(model, policy="sparse", use_cache=False)
    assert report.notes == [absent.note] and report.kernel_path == "torch"
    assert {k for layer in report.layers for k in layer.choices.values()} == {"csr"}
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-5)
    bf16 = accelerate(prune_smallest(tiny_model("opt"), 0.9), policy="auto", dtype="bf16", use_cache=False)
    assert bf16.replaced == 0 and bf16.notes == [absent.note]  # no bf16 sparse kernel without the extension


@needs_extension
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_accelerated_model_in_a_dtype_computes_what_the_dense_model_in_it_does(dtype):
    model = prune_smallest(tiny_model("llama"), 0.9)
    reference_model = prune_smallest(tiny_model("llama"), 0.9)
    if dtype == "bf16":
        reference_model.to(torch.bfloat16)
    else:
        for matrix in select_matrices(reference_model):
            matrix.weight().copy_(dequantize_rows(*quantize_rows(matrix.weight())))
    x = torch.randint(0, 90, (1, 9))
    report = accelerate(model, policy="sparse", dtype=dtype, use_cache=False)
    assert report.dtype == dtype and report.replaced == report.layers_total
    kernel = "csr16" if dtype == "bf16" else "csr16-int8"
    assert {k for layer in report.layers for k in layer.choices.values()} == {kernel}
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == report.layers_total and all(kernel in m.sparse for m in sparse)
    for original in select_matrices(reference_model):
        weight = model.get_submodule(original.module_name).out_in()
        assert torch.equal(weight == 0, original.weight() == 0)  # the mask is kept
        if dtype == "int8":
            assert torch.equal(weight, original.weight())  # parameters hold the dequantised int8 values
    with torch.inference_mode():
        got, expected = model(x).logits.float(), reference_model(x).logits.float()
    assert got.dtype == expected.dtype
    tolerance = 3e-2 if dtype == "bf16" else 1e-4
    assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max())


@pytest.mark.parametrize("faster", ["dense", "dense-int8"])
def test_int8_dense_layers_run_on_whichever_dense_form_measures_faster(faster, monkeypatch, tmp_path):
    """A layer without zeros in int8 runs on F.linear over its dequantised weights or on torch's int8 GEMM, as the
    dispatch measures them (a fake timer decides here); both compute the same dequantised product."""
    from sparselm.runtime import dispatch

    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path))

    def timer(weight, built, tokens, dense=None):
        seconds = {name: (1e-4 if name == faster else 1e-3) for name in ("dense", *built)}
        return {name: (lambda s=s: s) for name, s in seconds.items()}

    monkeypatch.setattr(dispatch, "kernel_samplers", timer)
    model = tiny_model("opt")  # no zeros
    report = accelerate(model, policy="auto", dtype="int8", use_cache=False)
    assert {k for layer in report.layers for k in layer.choices.values()} == {faster}
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == (report.layers_total if faster == "dense-int8" else 0)
    if layers:
        layer = layers[0]
        x = torch.randn(3, layer.in_features)
        expected = F.linear(x, layer.out_in(), layer.bias)  # the parameters hold the dequantised values
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_dispatch_cache_keys_differ_by_precision():
    from sparselm.runtime import dispatch

    w = torch.zeros(8, 8)
    keys = {dispatch.cache_key(w, 0.9, "unstructured", 1, 1, p) for p in ("fp32", "bf16", "int8")}
    assert len(keys) == 3


def test_dispatch_cache_keys_name_the_kernels_measured(monkeypatch):
    """A decision measured with other kernel sources, another code path, or torch's kernels alone is not reused."""
    from sparselm.runtime import dispatch, extension

    w = torch.zeros(8, 8)
    ids = iter(["0123456789abcdef-avx2", "fedcba9876543210-avx2", "0123456789abcdef-portable", "torch"])
    keys = set()
    for _ in range(4):
        monkeypatch.setattr(extension, "kernels_id", lambda chosen=next(ids): chosen)
        keys.add(dispatch.cache_key(w, 0.9, "unstructured", 1, 1))
    assert len(keys) == 4 and all(k.startswith(f"v{dispatch.CACHE_SCHEMA}|") for k in keys)
    monkeypatch.undo()
    state = extension.status()
    expected = f"{extension.source_digest()}-{state.path}" if state.available else "torch"
    assert dispatch.cache_key(w, 0.9, "unstructured", 1, 1).endswith(f"|kernels-{expected}")


def test_kernel_table_knows_the_own_kernels():
    assert KERNELS["csr16"].index_bytes == 2 and KERNELS["csr16-int8"].index_bytes == 2
    assert KERNELS["bitmap"].index_bytes == 0 and KERNELS["bitmap"].index_bytes_per_weight == 1 / 8
    assert KERNELS["bitmap-int8"].index_bytes == 0 and KERNELS["bitmap-int8"].index_bytes_per_weight == 1 / 8
    assert [k for k in KERNELS if KERNELS[k].native] == ["csr16", "csr16-int8", "bitmap", "bitmap-int8"]
    assert KERNELS["csr16"].max_columns == KERNELS["csr16-int8"].max_columns == 65536 and not KERNELS["bitmap"].max_columns
    assert sys.modules["sparselm.runtime.kernels"].MAX_CSR16_COLUMNS == 65536


@needs_extension
@pytest.mark.slow
def test_smollm_accelerated_in_bf16_and_int8_scores_as_the_dense_model_in_that_precision():
    """On the real model (50% global magnitude; PTB test, 2 windows of 256 tokens), the sparse kernels add no quality
    loss of their own: the bf16 accelerated model scores within 2% of the same model run dense in bf16 (measured on
    AVX2: 2187.3 against 2166.4, +0.97%: both round to bf16, in different places), and the int8 one within 0.1% of
    the dense model holding the same dequantised int8 weights (measured: equal). (Issue 14's targets compare against
    the sparse fp32 model instead; what bf16 and int8 themselves cost is reported by benchmarks/runtime_speed.py
    --quality, not asserted here.)"""
    from sparselm import load, load_tokenizer
    from sparselm.data import joined_text
    from sparselm.pruning import prune

    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer(joined_text("ptb", "test")[:20000], return_tensors="pt").input_ids[:, : 2 * 256].reshape(2, 256)

    def ppl(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            logits = model(ids).logits.float()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())

    def pruned() -> torch.nn.Module:
        model = load("smollm2-135m")
        prune(model, method="magnitude", sparsity=0.5, scope="global")
        return model

    dense_bf16 = pruned().to(torch.bfloat16)
    dense_int8 = pruned()
    for matrix in select_matrices(dense_int8):
        matrix.weight().copy_(dequantize_rows(*quantize_rows(matrix.weight())))
    found = {"dense bf16": ppl(dense_bf16), "dense int8": ppl(dense_int8)}
    for dtype in ("bf16", "int8"):
        model = pruned()
        report = accelerate(model, policy="sparse", dtype=dtype, use_cache=False)
        assert report.replaced == report.layers_total
        found[dtype] = ppl(model)
    print(f"token perplexity: {found}")
    assert 1 < found["dense int8"] < 5000  # a damaged model (about 2100 against about 57 dense), not a broken one
    assert abs(found["bf16"] / found["dense bf16"] - 1) <= 0.02, found
    assert abs(found["int8"] / found["dense int8"] - 1) <= 0.001, found


def test_the_kernel_sources_ship_with_the_package():
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["sparselm.runtime"]
    for name in extension.SOURCES:
        assert (extension.SOURCE_DIR / name).is_file()
        assert any(fnmatch.fnmatch(f"csrc/{name}", pattern) for pattern in shipped), name


def test_builds_are_cached_per_source_torch_version_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path))
    key = extension.build_key()
    assert extension.library_path().parent == tmp_path / "kernels" / key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_torch = extension.build_key()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER-CPU")
    other_cpu = extension.build_key()
    assert len({key, other_torch, other_cpu}) == 3
    monkeypatch.setattr(extension, "SOURCE_DIR", tmp_path)
    for name in extension.SOURCES:
        (tmp_path / name).write_text(f"// changed {name}")
    assert extension.build_key() != other_cpu
