"""Activation-quantised int8 (w8a8): the dense kernel against an independent reference, the 2% perplexity gate on
models built to pass and to fail it, and how `sparselm bench` and `sparselm run` show or refuse it."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from typer.testing import CliRunner

from evaluation_fixtures import SPECIALS, VOCAB, save_tiny, tiny_lm, tiny_tokenizer
from sparselm.cli import app
from sparselm.runtime import quality
from sparselm.runtime.accelerate import accelerate
from sparselm.runtime.kernels import KERNELS
from sparselm.runtime.modules import SparseLinear
from sparselm.storage.int8 import quantize_rows

generate_module = importlib.import_module("sparselm.runtime.generate")  # the module, not the function of that name

runner = CliRunner()
SEQLEN = 128  # the tiny models' context: the gate's windows are this long


def one_line(output: str) -> str:
    return " ".join(output.split())


def reference_w8a8(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The product torch's dynamic int8 linear computes, written out: per-row int8 weights (quantize_rows), and the
    activations quantised to uint8 with one affine scale over the whole call at the 7-bit range (0..127)."""
    q, scales = quantize_rows(weight)
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (high - low) / 127
    zero = round(-low / step)
    xq = torch.clamp(torch.round(x.double() / step) + zero, 0, 127)
    return ((xq - zero) * step) @ (q.double() * scales.double()[:, None]).t()


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("shape", [(48, 32), (40, 72)])
def test_dense_w8a8_equals_the_quantised_reference(shape, tokens):
    torch.manual_seed(tokens)
    weight = torch.randn(shape)
    weight[3] = 0.0  # an empty row: its scale is 1 and its outputs exactly 0
    weight[:, 5] = 0.0  # an empty column
    x = torch.randn(tokens, shape[1])
    kernel = KERNELS["dense-w8a8"]
    got = kernel.matmul(kernel.build(weight), x)
    want = reference_w8a8(weight, x)
    assert got.shape == (tokens, shape[0]) and got.dtype == torch.float32
    assert torch.equal(got[:, 3], torch.zeros(tokens))
    step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 127
    # the same quantised operands; left is float rounding of the int32 sums and of fbgemm's requantisation
    tolerance = 1e-4 * float(want.abs().max()) + 1e-3 * step * float(weight.abs().max())
    assert (got.double() - want).abs().max() <= tolerance
    # and w8a8 is a coarse product: far from the float one, which shows the reference is not the float product
    assert (want - x.double() @ weight.double().t()).abs().max() > 10 * tolerance


def test_accelerate_w8a8_runs_every_matrix_on_the_dense_w8a8_kernel():
    model = tiny_lm("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    report = accelerate(model, "auto", tokens=(1, 8), dtype="w8a8", use_cache=False)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert report.dtype == "w8a8" and len(layers) == report.layers_total == len(original)
    assert all(m.dense_kernel == "dense-w8a8" and set(m.choices.values()) == {"dense"} for m in layers)
    for name, weight in original.items():  # the parameters hold the int8 weights the model computes with
        q, scales = quantize_rows(weight)
        assert torch.equal(model.get_parameter(name).detach(), q.float() * scales[:, None])


def sharp_gpt2(outlier: float | None) -> torch.nn.Module:
    """A tiny GPT-2 whose tied embedding is scaled 10× (confident predictions, so perplexity feels noise); with
    `outlier`, every LayerNorm's gain on channel 3 is that large, the activation outlier that breaks w8a8."""
    model = tiny_lm("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10.0)
        for name, module in model.named_modules():
            if outlier is not None and name.rsplit(".", 1)[-1] in ("ln_1", "ln_2"):
                module.weight[3] = outlier
    return model


def sampled_text(model: torch.nn.Module, windows: int = quality.WINDOWS, seed: int = 0) -> str:
    """`windows` texts of SEQLEN characters sampled from the model itself, one per evaluation window: the text the
    fp32 model predicts best on average, so any perturbation of it can only raise the expected perplexity."""
    tokenizer, generator = tiny_tokenizer("gpt2"), torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for _ in range(windows):
            ids = torch.randint(len(SPECIALS), VOCAB, (1, 1), generator=generator)
            while ids.shape[1] < SEQLEN:
                logits = model(ids).logits[0, -1]
                logits[: len(SPECIALS)] = -float("inf")
                ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], dim=1)
            chunks.append(tokenizer.decode(ids[0]))
    return "".join(chunks)


def check_of(model: torch.nn.Module) -> quality.QualityCheck:
    text = sampled_text(model)
    assert len(tiny_tokenizer("gpt2")(text)["input_ids"]) == quality.WINDOWS * SEQLEN
    return quality.w8a8_check(model, quality.w8a8_model(model), tiny_tokenizer("gpt2"), text)


def test_the_gate_refuses_w8a8_on_a_model_with_an_outlier_channel_quoting_the_change():
    check = check_of(sharp_gpt2(outlier=200.0))
    assert check.windows == quality.WINDOWS and check.seqlen == SEQLEN
    assert check.change > 0.03 and not check.acceptable  # measured +4.4% when written
    with pytest.raises(quality.SparselmError) as refused:
        quality.require_acceptable(check)
    message = str(refused.value)
    assert f"{check.change:+.1%}" in message and f"{check.w8a8_ppl:.2f}" in message and "2%" in message


def test_the_gate_accepts_w8a8_on_the_same_model_without_the_outlier():
    check = check_of(sharp_gpt2(outlier=None))
    assert abs(check.change) < 0.005 and check.acceptable  # measured -0.0% when written
    quality.require_acceptable(check)
    # the change is the ratio of two independently measured perplexities
    assert check.change == pytest.approx(check.w8a8_ppl / check.reference_ppl - 1)


def test_the_gate_compares_with_the_model_as_given():
    model = sharp_gpt2(outlier=200.0)
    text = sampled_text(model)
    from sparselm.evaluation.perplexity import perplexity

    direct = perplexity(model, tiny_tokenizer("gpt2"), text, SEQLEN, max_windows=quality.WINDOWS)
    check = quality.w8a8_check(model, quality.w8a8_model(model), tiny_tokenizer("gpt2"), text)
    assert check.reference_ppl == pytest.approx(direct.token_ppl, rel=1e-6)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # w8a8_model left the model unchanged


def refusing_check(*args, **kwargs) -> quality.QualityCheck:
    return quality.QualityCheck(reference_ppl=56.76, w8a8_ppl=171.8, source="PTB test", windows=4, seqlen=512)


BENCH = ["--tokens", "8", "--rounds", "1", "--no-size", "--threads", "1"]


def test_bench_w8a8_prints_the_change_and_times_dense_w8a8_as_a_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", "llama")
    out = json.loads(runner.invoke(app, ["bench", str(model), *BENCH, "--dtype", "w8a8", "--json"]).stdout)
    check = out["w8a8_quality"]
    assert out["dtype"] == "w8a8" and check["acceptable"] and abs(check["change"]) <= 0.02
    assert check["windows"] == 4 and check["seqlen"] == SEQLEN and check["source"] == "PTB test"
    for row in [*out["prefill"], out["decode"]]:
        assert row["speedup_over_w8a8_low"] <= row["speedup_over_w8a8"] <= row["speedup_over_w8a8_high"]
        assert row["dense_w8a8_ms_low"] <= row["dense_w8a8_ms"] <= row["dense_w8a8_ms_high"]
    human = runner.invoke(app, ["bench", str(model), *BENCH, "--dtype", "w8a8"])
    text = one_line(human.output)
    assert human.exit_code == 0, human.output
    assert "dense w8a8" in text and "w8a8 changes perplexity by" in text and "allowed up to 2%" in text


def test_bench_w8a8_is_refused_with_the_measured_change(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "w8a8_check", refusing_check)
    model = save_tiny(tmp_path / "m", "llama")
    result = runner.invoke(app, ["bench", str(model), *BENCH, "--dtype", "w8a8"])
    text = one_line(result.output)
    assert result.exit_code != 0 and "Traceback" not in text
    assert "--dtype w8a8 refused: w8a8 changes perplexity by +202.7% (171.80 vs 56.76 as given" in text
    assert "more than the 2% allowed" in text


def test_bench_fp32_leaves_out_a_dense_w8a8_that_costs_too_much_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "w8a8_check", refusing_check)
    model = save_tiny(tmp_path / "m", "llama")
    result = runner.invoke(app, ["bench", str(model), *BENCH, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["w8a8_quality"]["change"] == pytest.approx(171.8 / 56.76 - 1)
    assert all(row["dense_w8a8_ms"] is None and row["speedup_over_w8a8"] is None for row in out["prefill"])
    assert any(n.startswith("dense w8a8 is not a baseline here: w8a8 changes perplexity by +202.7%")
               for n in out["notes"])


def test_w8a8_needs_a_tokenizer_and_says_so_before_loading(tmp_path):
    tiny_lm("llama").save_pretrained(tmp_path / "m")
    for command in (["bench", str(tmp_path / "m")], ["run", str(tmp_path / "m"), "--prompt", "Hi"]):
        result = runner.invoke(app, [*command, "--dtype", "w8a8"])
        text = one_line(result.output)
        assert result.exit_code != 0 and "has no tokenizer" in text and "--dtype int8" in text


def test_run_w8a8_prints_the_change_or_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", "llama")
    args = ["run", str(model), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "w8a8", "--threads", "1"]
    quantised = []  # the model is quantised once: the checked copy is the one that generates
    accelerate = generate_module.accelerate
    monkeypatch.setattr(generate_module, "accelerate", lambda m, *a, **k: quantised.append(m) or accelerate(m, *a, **k))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "w8a8 changes perplexity by" in one_line(result.output)
    assert len(quantised) == 1
    monkeypatch.setattr(quality, "w8a8_check", refusing_check)
    refused = runner.invoke(app, args)
    assert refused.exit_code != 0 and "--dtype w8a8 refused" in one_line(refused.output)
