"""Sparse runtime: accelerated models compute what the dense ones do, with the kernel each layer measured best."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import DECODER_ONLY, tiny_model
from sparselm.errors import SparselmError
from sparselm.runtime import SparseLinear, accelerate, bench, extension
from sparselm.runtime.modules import SiblingGroup
from sparselm.runtime.kernels import block_sizes_of, build_csr, feature_major_mm, token_major, transposed_copy
from sparselm.weights import select_matrices
from test_storage import prune_smallest

accelerate_module = importlib.import_module("sparselm.runtime.accelerate")  # the module, not the function
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_extension = pytest.mark.skipif(not extension.status().available, reason="sparselm's C++ kernels did not build")


def inputs(family: str, tokens: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 90, (2, tokens), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids}
    if family in ("bart", "t5", "pegasus"):
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


def logits(model: torch.nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**kw).logits


def block_prune(model: torch.nn.Module, block: int, sparsity: float) -> torch.nn.Module:
    """Test-only block pruning: drop the block × block tiles with the smallest L2 norm in each matrix."""
    for m in select_matrices(model):
        w = m.weight()
        rows, cols = w.shape
        tiles = w.reshape(rows // block, block, cols // block, block).norm(dim=(1, 3))
        k = int(tiles.numel() * sparsity)
        drop = tiles <= tiles.flatten().kthvalue(k).values
        w[drop.repeat_interleave(block, 0).repeat_interleave(block, 1)] = 0
    return model


def test_accelerated_outputs_equal_dense(family):
    check_equal_outputs(family, "sparse")


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_auto_policy_outputs_equal_dense(family):
    check_equal_outputs(family, "auto")


def check_equal_outputs(family: str, policy: str) -> None:
    model = prune_smallest(tiny_model(family), 0.9)
    kw = inputs(family)
    reference = logits(model, kw)
    n_matrices = len(select_matrices(model))
    report = accelerate(model, policy=policy, tokens=(1, 24))
    if policy == "sparse":
        assert report.replaced == report.layers_total == n_matrices
        assert any(isinstance(m, SparseLinear) for m in model.modules())
    assert torch.allclose(logits(model, kw), reference, atol=1e-5, rtol=1e-4)
    assert all(set(layer.choices) == {1, 24} for layer in report.layers)


FUSED = {
    "gpt2": set(),  # c_attn already holds q, k and v in one matrix
    "llama": {(("q_proj", "k_proj", "v_proj"), True), (("gate_proj", "up_proj"), False)},
    "bert": {(("query", "key", "value"), True)},
    "bart": {(("q_proj", "k_proj", "v_proj"), True), (("k_proj", "v_proj"), True)},  # + cross-attention k, v
    "t5": {(("q", "k", "v"), True), (("k", "v"), True)},
}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_layers_reading_the_same_input_run_as_one_product(family, monkeypatch):
    model = prune_smallest(tiny_model(family), 0.9)
    kw = inputs(family)
    reference = logits(model, kw)
    report = accelerate(model, policy="sparse")
    found = {(tuple(n.rpartition(".")[2] for n in g.members), g.token_major) for g in report.fused_groups}
    assert found == FUSED[family]
    products = []
    compute = SiblingGroup._compute
    monkeypatch.setattr(SiblingGroup, "_compute", lambda self, *a: (products.append(self), compute(self, *a))[1])
    assert torch.allclose(logits(model, kw), reference, atol=1e-5, rtol=1e-4)
    assert len(products) == len(set(map(id, products))) == len(report.fused_groups)  # one product per group


def test_projections_of_attention_inputs_return_token_major_outputs():
    model = prune_smallest(tiny_model("llama"), 0.9)
    accelerate(model, policy="sparse")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(1, 12, attention.q_proj.in_features)
    with torch.inference_mode():
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        out, gate = attention.o_proj(x), mlp.gate_proj(x)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    # feature-major: the next sparse product needs no transpose
    assert out.transpose(-1, -2).is_contiguous() and gate.transpose(-1, -2).is_contiguous()
    gpt2 = prune_smallest(tiny_model("gpt2"), 0.9)
    accelerate(gpt2, policy="sparse")
    block = gpt2.transformer.h[0]
    assert block.attn.c_attn.token_major and not block.attn.c_proj.token_major and not block.mlp.c_fc.token_major
    with torch.inference_mode():
        assert block.attn.c_attn(torch.randn(1, 12, gpt2.config.n_embd)).is_contiguous()


def test_group_members_called_on_different_inputs_compute_their_own():
    model = prune_smallest(tiny_model("llama"), 0.9)
    mlp = model.model.layers[0].mlp
    gate_weight, up_weight = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()

    def gate(x: torch.Tensor) -> torch.Tensor:
        return x @ gate_weight.t()

    def up(x: torch.Tensor) -> torch.Tensor:
        return x @ up_weight.t()

    accelerate(model, policy="sparse")
    assert mlp.gate_proj.group is mlp.up_proj.group is not None
    x, y = torch.randn(1, 5, mlp.gate_proj.in_features), torch.randn(1, 5, mlp.gate_proj.in_features)
    with torch.inference_mode():
        assert torch.allclose(mlp.gate_proj(x), gate(x), atol=1e-5)
        assert torch.allclose(mlp.up_proj(y), up(y), atol=1e-5)  # not the rows computed for x
        assert torch.allclose(mlp.gate_proj(x), gate(x), atol=1e-5)  # x again: a fresh product
        assert torch.allclose(mlp.up_proj(x), up(x), atol=1e-5)
    x.add_(1.0)  # the same tensor written in place between two members: recomputed
    assert torch.allclose(mlp.gate_proj(x), gate(x), atol=1e-5)
    x.add_(1.0)
    assert torch.allclose(mlp.up_proj(x), up(x), atol=1e-5)


def measured(choice: str, seconds: dict[str, float]) -> dict:
    """A dispatch decision for one token count: its choice and the median seconds of dense and each kernel."""
    return {"choice": choice, "seconds": seconds, "ratios": {k: [seconds["dense"] / s] for k, s in seconds.items()}}


@needs_extension
def test_siblings_that_measured_different_kernels_agree_on_the_cheapest_for_all(monkeypatch):
    """Layer-by-layer measurement cannot see that siblings sharing a kernel run as one product: where q/k/v (or
    gate/up) chose different sparse kernels they are put on the one that costs the group least in total, then fused."""
    model = prune_smallest(tiny_model("llama"), 0.9)
    kw = inputs("llama")
    reference = logits(model, kw)
    # q: csr16 at 4 + bitmap at 7 µs; k, v: bitmap at 3 + csr16 at 5 µs → bitmap costs the group 13, csr16 14
    seconds = {"q_proj": ("csr16", 4e-6, 7e-6), "k_proj": ("bitmap", 5e-6, 3e-6), "v_proj": ("bitmap", 5e-6, 3e-6)}
    # accelerate visits the matrices in this order; the other layers (gate/up among them) all take csr16
    decisions = iter(
        seconds.get(m.module_name.rpartition(".")[2], ("csr16", 4e-6, 5e-6)) for m in select_matrices(model)
    )

    def choose(weight, kernels, policy, tokens, *args, **kwargs):
        kernel, csr16, bitmap = next(decisions)
        basis = {t: measured(kernel, {"dense": 1e-5, "csr16": csr16, "bitmap": bitmap}) for t in tokens}
        return {t: kernel for t in tokens}, basis, False

    monkeypatch.setattr(accelerate_module, "choose", choose)
    report = accelerate(model, policy="auto", tokens=(12,), use_cache=False)
    attention = [layer for layer in report.layers if layer.name.split(".")[-2] in seconds]
    assert attention and all(layer.choices == {12: "bitmap"} for layer in attention)
    assert {layer.choices[12] for layer in report.layers if layer not in attention} == {"csr16"}
    fused = {tuple(n.rpartition(".")[2] for n in g.members): g.kernels for g in report.fused_groups}
    assert fused[("q_proj", "k_proj", "v_proj")] == ["bitmap"]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.kernel_for(12) == "bitmap" and q_proj.group.kernel_for(12) == "bitmap"
    assert set(q_proj.sparse) == {"bitmap"}  # its csr16 form, used at no token count any more, is dropped
    assert torch.allclose(logits(model, kw), reference, atol=1e-5, rtol=1e-4)


def test_fusion_can_be_turned_off():
    model = prune_smallest(tiny_model("llama"), 0.9)
    report = accelerate(model, policy="sparse", fuse=False)
    assert report.fused_groups == []
    assert all(m.group is None for m in model.modules() if isinstance(m, SparseLinear))


def test_sparse_product_ignores_the_memory_it_writes_into():
    weight = torch.randn(24, 16)
    weight[weight.abs() < 1.0] = 0
    weight[3] = 0  # a row with nothing kept
    x = torch.randn(7, 16)
    for _ in range(3):  # fresh outputs often reuse freed blocks holding NaNs
        torch.full((24, 7), float("nan"))
        assert torch.equal(feature_major_mm(build_csr(weight), x)[:, 3], torch.zeros(7))
    assert torch.allclose(feature_major_mm(build_csr(weight), x), x @ weight.t(), atol=1e-5)
    out = torch.full((24, 7), float("nan"))
    torch.addmm(out, build_csr(weight), x.t().contiguous(), beta=0, out=out)  # what feature_major_mm relies on
    assert torch.allclose(out, weight @ x.t(), atol=1e-5)


@pytest.mark.parametrize("shape", [(128, 576), (16, 24), (5, 24), (16, 7), (1, 8)])
def test_tiled_transposes_equal_plain_ones(shape):
    x = torch.randn(*shape)
    for source in (x, torch.randn(shape[1], shape[0]).t()):  # contiguous and a strided view
        out = transposed_copy(source)
        assert out.is_contiguous() and torch.equal(out, source.t())
    y = torch.randn(shape[1], shape[0]).t()  # a feature-major result
    assert token_major(y).is_contiguous() and torch.equal(token_major(y), y)


def test_state_dict_and_orientation_are_unchanged():
    model = prune_smallest(tiny_model("gpt2"), 0.8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerate(model, policy="sparse")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_block_structured_masks_run_on_bsr():
    model = block_prune(tiny_model("llama"), 16, 0.5)
    kw = inputs("llama")
    reference = logits(model, kw)
    report = accelerate(model, policy="sparse")
    assert {layer.structure for layer in report.layers} == {"block:16x16"}
    assert all(set(layer.choices.values()) == {"bsr16"} for layer in report.layers)
    assert torch.allclose(logits(model, kw), reference, atol=1e-5, rtol=1e-4)
    w = select_matrices(prune_smallest(tiny_model("llama"), 0.5))[0].weight()
    assert block_sizes_of(w != 0) == []  # unstructured: no block size


def test_layer_picks_the_choice_of_the_nearest_token_count():
    linear = torch.nn.Linear(16, 8)
    layer = SparseLinear(linear, transposed=False, choices={1: "dense", 128: "csr"})
    assert layer.kernel_for(1) == "dense" and layer.kernel_for(2) == "dense"
    assert layer.kernel_for(100) == "csr" and layer.kernel_for(4096) == "csr"
    x = torch.randn(3, 40, 16)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)


def test_dense_matrices_and_dense_policy_change_nothing():
    model = tiny_model("bert")
    report = accelerate(model, policy="auto")
    assert report.replaced == 0 and not any(isinstance(m, SparseLinear) for m in model.modules())
    pruned = prune_smallest(tiny_model("bert"), 0.9)
    assert accelerate(pruned, policy="dense").replaced == 0


def test_bad_arguments_are_clear_errors():
    model = tiny_model("gpt2")
    with pytest.raises(SparselmError, match="unknown runtime policy"):
        accelerate(model, policy="fast")
    with pytest.raises(SparselmError, match="token counts must be positive"):
        accelerate(model, tokens=(0,))
    accelerate(prune_smallest(model, 0.9), policy="sparse")
    with pytest.raises(SparselmError, match="already accelerated"):
        accelerate(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_pattern_on_cpu_is_a_clear_error():
    with pytest.raises(SparselmError, match="needs a CUDA GPU.*use policy 'auto'"):
        accelerate(tiny_model("llama"), policy="semi-structured")


@pytest.mark.gpu
@needs_cuda
def test_semi_structured_on_cuda_matches_dense():
    model = tiny_model("llama").half().cuda()
    for m in select_matrices(model):
        w = m.weight().reshape(-1, 4)
        w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0.0)
    kw = {k: v.cuda() for k, v in inputs("llama", 32).items()}
    reference = logits(model, kw)
    report = accelerate(model, policy="semi-structured")
    assert report.replaced == report.layers_total
    assert torch.allclose(logits(model, kw), reference, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("family,policy", [("gpt2", "auto"), ("llama", "sparse"), ("bert", "sparse")])
def test_bench_reports_prefill_decode_and_sizes(family, policy, tmp_path):
    model = prune_smallest(tiny_model(family), 0.9)
    model.save_pretrained(tmp_path / "m")
    result = bench(str(tmp_path / "m"), tokens=[1, 16], policy=policy, rounds=2, steps=2)
    assert [r.tokens for r in result.prefill] == [1, 16]
    assert all(r.dense_ms > 0 and r.accelerated_ms > 0 and r.speedup > 0 for r in result.prefill)
    for r in [*result.prefill, *([result.decode] if result.decode else [])]:
        for side in ("dense_ms", "accelerated_ms", "speedup"):
            assert getattr(r, f"{side}_low") <= getattr(r, side) <= getattr(r, f"{side}_high")
        assert r.within_noise  # two rounds cannot show that the sides differ
    assert (result.decode is not None) == (family in DECODER_ONLY)
    assert result.size.packed_bytes < result.size.dense_bytes
    assert result.report.layers_total == len(select_matrices(model))


def test_bench_of_a_dense_model_runs_the_same_computation_on_both_sides(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path / "m")
    result = bench(str(tmp_path / "m"), tokens=[8], rounds=3, steps=2, measure_size=False)
    assert result.report.replaced == 0 and result.rounds == 3
    row = result.prefill[0]
    assert row.speedup_low <= row.speedup <= row.speedup_high


def test_bench_without_the_bf16_baseline_times_only_fp32_and_accelerated(tmp_path, monkeypatch):
    """A sweep on a CPU that emulates bf16 skips that baseline: its fields are None, nothing else changes, and the
    bf16 model is never built or run."""
    prune_smallest(tiny_model("llama"), 0.9).save_pretrained(tmp_path / "m")
    converted: list[torch.dtype] = []
    real_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        converted.extend(a for a in args if isinstance(a, torch.dtype))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    result = bench(str(tmp_path / "m"), tokens=[8], rounds=2, steps=2, measure_size=False, bf16_baseline=False)
    assert torch.bfloat16 not in converted
    for row in [*result.prefill, result.decode]:
        assert row.dense_ms > 0 and row.accelerated_ms > 0 and row.speedup_low <= row.speedup <= row.speedup_high
        bf16 = {k: v for k, v in row.to_json().items() if "bf16" in k}
        assert len(bf16) == 7 and set(bf16.values()) == {None}
