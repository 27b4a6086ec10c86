"""`accelerate(model)`: swap each prunable Linear/Conv1D for a SparseLinear where a sparse kernel measured faster."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from ..errors import SparselmError
from ..progress import SILENT, Progress
from ..storage.int8 import dequantize_rows, quantize_rows
from ..weights import Matrix, select_matrices
from . import dispatch, extension
from .fusion import trace_layers
from .inputs import random_prefill
from .kernels import block_sizes_of, cpu_candidates, is_two_four, kernel_fits, require_cuda
from .modules import SiblingGroup, SparseLinear
from .timing import Speedup

Policy = Literal["auto", "sparse", "dense", "semi-structured"]
POLICIES = ("auto", "sparse", "dense", "semi-structured")
DType = Literal["fp32", "bf16", "int8", "w8a8"]
DEFAULT_TOKENS = (1, 128)
TRACE_TOKENS = 8


@dataclass(frozen=True)
class Precision:
    """How the accelerated model computes: its activations' dtype, the bytes of a stored weight value, the dense
    kernel it is measured against (None: `F.linear` on the weight), the kernels measured against that dense besides
    torch's CSR/BSR (sparselm's own, and torch's weight-only int8 GEMM: on AMD Zen 4 it ran 5× slower than fp32
    `F.linear` for one token and 38× for 128, so it is measured, not assumed) and whether the weights are rounded to
    per-row int8 first (the parameters then hold the dequantised values every kernel computes with)."""

    name: str
    activations: torch.dtype | None  # None: the model's dtype as loaded
    value_bytes: int | None  # None: the weight's element size
    dense_kernel: str | None
    kernels: tuple[str, ...]
    torch_kernels: bool  # torch's CSR/BSR kernels compute in this precision
    int8_weights: bool = False


PRECISIONS = {
    "fp32": Precision("fp32", None, None, None, ("csr16", "bitmap"), True),
    "bf16": Precision("bf16", torch.bfloat16, 2, None, ("csr16", "bitmap"), False),  # torch's CSR: no bf16 CPU GEMM
    # weight-only int8, activations as loaded; dense is F.linear over the dequantised weights or torch's int8 GEMM
    "int8": Precision("int8", None, 1, None, ("csr16-int8", "bitmap-int8", "dense-int8"), False, True),
    # int8 weights and dynamically quantised activations: lossy on models with activation outliers, so `bench` and
    # `generate` offer it only with its measured perplexity change (runtime.quality)
    "w8a8": Precision("w8a8", None, 1, "dense-w8a8", (), False, True),
}
DTYPES = tuple(PRECISIONS)


@dataclass(frozen=True)
class LayerChoice:
    """One prunable matrix: its sparsity and structure, the kernel chosen per token count and what was measured."""

    name: str
    shape: list[int]
    sparsity: float
    structure: str
    choices: dict[int, str]
    microseconds: dict[int, dict[str, float]]
    speedups: dict[int, dict[str, dict[str, Any]]]
    cached: bool

    @property
    def replaced(self) -> bool:
        return any(k != "dense" for k in self.choices.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FusedGroup:
    """Replaced layers that read the same activations and run as one sparse product."""

    members: list[str]
    kernels: list[str]
    token_major: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AccelerateReport:
    """What `accelerate` did to a model: every matrix's kernel choices and the fused groups."""

    policy: str
    threads: int
    torch: str
    tokens: list[int]
    layers: list[LayerChoice]
    fused_groups: list[FusedGroup]
    dtype: str = "fp32"
    kernel_path: str = "torch"  # the C++ kernels' CPU code path (portable|avx2|avx512|avx512bf16), "torch" without them
    notes: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> int:
        return sum(1 for layer in self.layers if layer.replaced)

    @property
    def layers_total(self) -> int:
        return len(self.layers)

    @property
    def choices(self) -> dict[str, dict[str, int]]:
        """How many layers chose each kernel, per token count."""
        counts: dict[str, dict[str, int]] = {}
        for layer in self.layers:
            for t, k in layer.choices.items():
                counts.setdefault(str(t), {}).setdefault(k, 0)
                counts[str(t)][k] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "threads": self.threads,
            "torch": self.torch,
            "tokens": self.tokens,
            "replaced": self.replaced,
            "layers_total": self.layers_total,
            "choices": self.choices,
            "fused_groups": [g.to_json() for g in self.fused_groups],
            "layers": [layer.to_json() for layer in self.layers],
            "dtype": self.dtype,
            "kernel_path": self.kernel_path,
            "notes": self.notes,
        }


def structure_of(keep: torch.Tensor, blocks: list[int]) -> str:
    if blocks:
        return f"block:{blocks[0]}x{blocks[0]}"
    return "2:4" if is_two_four(keep) else "unstructured"


def candidates(
    weight: torch.Tensor, keep: torch.Tensor, blocks: list[int], policy: str, precision: Precision = PRECISIONS["fp32"]
) -> list[str]:
    """Sparse kernels that can run this weight where it lives, in this precision."""
    if policy == "semi-structured" and weight.device.type != "cuda":
        raise SparselmError("2:4 semi-structured kernels run on CUDA only; move the model to the GPU (model.cuda())")
    if weight.device.type == "cuda":
        half = weight.dtype in (torch.float16, torch.bfloat16)
        return ["semi-structured"] if half and is_two_four(keep) else []
    torch_kernels = cpu_candidates(blocks) if precision.torch_kernels else []
    own = [k for k in precision.kernels if weight.dtype != torch.float16 and kernel_fits(weight, k)]
    return torch_kernels + own


def sparse_policy_kernel(kernels: list[str]) -> str:
    """policy `sparse`: the largest block kernel when the mask is made of blocks, else sparselm's own CSR kernel when
    it is loaded, else the first candidate."""
    blocks = [k for k in kernels if k.startswith("bsr")]
    own = [k for k in kernels if k.startswith("csr16")]
    return (blocks or own or kernels)[0]


def choose(
    weight: torch.Tensor,
    kernels: list[str],
    policy: str,
    tokens: list[int],
    sparsity: float,
    structure: str,
    decisions: dispatch.Decisions,
    built: dict[str, Any],
    precision: Precision = PRECISIONS["fp32"],
) -> tuple[dict[int, str], dict[int, dict[str, Any]], bool]:
    """Per token count: the kernel to use, the decision behind it (policy auto) and whether nothing was measured."""
    if policy == "dense" or not kernels or (sparsity == 0.0 and policy != "auto"):
        return {t: "dense" for t in tokens}, {}, True
    if policy in ("sparse", "semi-structured"):
        return {t: sparse_policy_kernel(kernels) for t in tokens}, {}, True
    return dispatch.choose(
        weight, kernels, tokens, sparsity, structure, decisions, built, precision=precision.name,
        value_bytes=precision.value_bytes or weight.element_size(), dense_kernel=precision.dense_kernel,
    )


def speedups_of(decision: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each sparse kernel's speed-up over dense (median, range over rounds, within noise) from a dispatch decision."""
    return {kernel: Speedup(tuple(ratios)).as_dict() for kernel, ratios in decision["ratios"].items()}


def replace_module(
    model: nn.Module, matrix: Matrix, choices: dict[int, str], built: dict[str, Any], dense_kernel: str | None = None
) -> None:
    parent_name, _, child = matrix.module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, SparseLinear(matrix.module, matrix.transposed, choices, built, dense_kernel))


def check_settings(policy: str, threads: int | None, dtype: str = "fp32") -> None:
    """Fail on a policy, thread count or dtype accelerate() cannot use (callers check before loading a model)."""
    if policy not in POLICIES:
        raise SparselmError(f"unknown runtime policy '{policy}'; choose one of: {', '.join(POLICIES)}")
    if dtype not in DTYPES:
        raise SparselmError(f"unknown runtime dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    if dtype != "fp32" and policy == "semi-structured":
        raise SparselmError(f"--dtype {dtype} runs on CPU kernels; use policy auto, sparse or dense with it")
    if policy == "semi-structured":
        require_cuda("semi-structured")
    if threads is not None and threads < 1:
        raise SparselmError(f"--threads must be at least 1, got {threads}")


def accelerate(
    model: nn.Module,
    policy: Policy = "auto",
    tokens: Iterable[int] = DEFAULT_TOKENS,
    threads: int | None = None,
    use_cache: bool = True,
    remeasure: bool = False,
    progress: Progress = SILENT,
    fuse: bool = True,
    example_inputs: dict[str, Any] | None = None,
    dtype: DType = "fp32",
) -> AccelerateReport:
    """Replace prunable matrices in place by SparseLinear where a sparse kernel wins; returns the per-layer choices.

    policy: `auto` measures dense against each sparse kernel per layer shape, sparsity and token count (see
    runtime.dispatch for when a sparse kernel is chosen and when a decision is cached); `remeasure` ignores cached
    decisions and replaces them, `use_cache=False` neither reads nor writes the cache;
    `sparse` uses a sparse kernel wherever the matrix has zeros; `dense` changes nothing; `semi-structured` uses
    CUDA 2:4 kernels and fails clearly without CUDA.
    One traced forward on `example_inputs` (by default a few random token ids) arranges the replaced layers: those
    that project an attention module's inputs return token-major outputs (attention's fast kernels need them), and
    with `fuse` those that read the same activations run as one sparse product (their kernels agreed first where
    they measured different ones: `agreed_kernels`).

    dtype: `fp32` keeps the model's dtype as loaded; `bf16` converts the model to bfloat16 (activations and values);
    `int8` quantises every prunable matrix to weight-only int8 (a scale per output row; zeros stay zero; the
    parameters then hold the dequantised values the model computes with) and runs each on whichever measures
    fastest of `F.linear` over those values, torch's dense int8 GEMM and the sparse int8 kernels, activations as
    loaded; `w8a8` quantises the weights alike and runs every matrix on torch's dense
    int8 GEMM with dynamically quantised activations (no sparse kernel computes in it): fast, but lossy where
    activations have outlier channels, so measure it with `runtime.quality` first (`bench` and `generate` do, and
    refuse it beyond a 2% perplexity change). Dense and sparse are measured in that dtype, and cached per dtype.
    Without sparselm's C++ kernels (no compiler) torch's kernels are used, with one note in the report.
    """
    check_settings(policy, threads, dtype)
    precision = PRECISIONS[dtype]
    if threads is not None:
        torch.set_num_threads(threads)
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise SparselmError("the model is already accelerated; call accelerate() on a freshly loaded model")
    if dtype != "fp32" and any(p.device.type != "cpu" for p in model.parameters()):
        raise SparselmError(f"dtype {dtype} runs sparselm's CPU kernels; move the model to the CPU or use dtype fp32")
    tokens = sorted({int(t) for t in tokens})
    if not tokens or tokens[0] < 1:
        raise SparselmError(f"token counts must be positive integers, got {tokens}")
    if policy in ("auto", "sparse") and extension.will_compile():
        progress.start("compiling sparselm's sparse kernels (once per torch version)", None)
        extension.status()
    if precision.activations is not None:
        model.to(precision.activations)
    path = dispatch.cache_path()
    decisions = dispatch.Decisions(dispatch.load_cache(path) if use_cache else {}, remeasure)
    layers: dict[str, LayerChoice] = {}  # by module name
    matrices = select_matrices(model)
    progress.start("choosing kernels", len(matrices))
    for matrix in matrices:
        if precision.int8_weights:
            matrix.weight().copy_(dequantize_rows(*quantize_rows(matrix.weight()), matrix.weight().dtype))
        weight = matrix.weight().detach()
        keep = weight != 0
        sparsity = 1.0 - float(keep.count_nonzero()) / keep.numel()
        blocks = block_sizes_of(keep) if sparsity else []
        structure = structure_of(keep, blocks) if sparsity else "dense"
        kernels = candidates(weight, keep, blocks, policy, precision)
        built: dict[str, Any] = {}
        choices, basis, cached = choose(
            weight, kernels, policy, tokens, sparsity, structure, decisions, built, precision
        )
        if precision.dense_kernel or any(k != "dense" for k in choices.values()):
            replace_module(model, matrix, choices, built, precision.dense_kernel)
        layers[matrix.module_name] = LayerChoice(
            name=matrix.name,
            shape=list(matrix.shape),
            sparsity=sparsity,
            structure=structure,
            choices=choices,
            microseconds={t: {k: v * 1e6 for k, v in b["seconds"].items()} for t, b in basis.items()},
            speedups={t: speedups_of(b) for t, b in basis.items()},
            cached=cached,
        )
        progress.advance()
    if use_cache and policy == "auto":
        dispatch.save_cache(path, decisions.cache)
    groups = arrange_outputs(model, example_inputs, fuse, layers)
    kernels = extension.status()
    notes = [kernels.note] if kernels.note and policy in ("auto", "sparse") else []
    return AccelerateReport(
        policy, torch.get_num_threads(), torch.__version__, tokens, list(layers.values()), groups, dtype, kernels.path,
        notes,
    )


def agreed_kernels(members: list[LayerChoice]) -> dict[int, str]:
    """Token counts at which sibling layers chose different sparse kernels, each with the kernel measured on every
    member that costs them least in total: run by all of them it is one product (one transpose of the activations
    and one call instead of one per layer), a saving that measuring layer by layer cannot see."""
    agreed = {}
    for t in members[0].choices:
        chosen = {m.choices[t] for m in members}
        measured = [m.microseconds.get(t, {}) for m in members]
        common = set.intersection(*(set(us) for us in measured)) - {"dense"}
        if len(chosen) > 1 and "dense" not in chosen and common:
            agreed[t] = min(sorted(common), key=lambda k: sum(us[k] for us in measured))
    return agreed


def arrange_outputs(
    model: nn.Module, example_inputs: dict[str, Any] | None, fuse: bool, layers: dict[str, LayerChoice]
) -> list[FusedGroup]:
    """Trace one forward pass: projections of attention inputs return token-major outputs, and (with `fuse`)
    layers called on the same tensor share one product, their kernels agreed where they chose different ones
    (`layers`, by module name, then records the agreed choices). Returns the fused groups."""
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    if not names:
        return []
    inputs = example_inputs if example_inputs is not None else random_prefill(model, TRACE_TOKENS)
    trace = trace_layers(model, names, inputs)
    for name in trace.attention_inputs:
        model.get_submodule(name).token_major = True
    described = []
    for members in trace.groups if fuse else []:
        for tokens, kernel in agreed_kernels([layers[n] for n in members]).items():
            for name in members:
                model.get_submodule(name).use(tokens, kernel)
                layers[name] = replace(layers[name], choices={**layers[name].choices, tokens: kernel})
        group = SiblingGroup([model.get_submodule(n) for n in members])
        token_major = all(m.token_major for m in group.members)
        described.append(FusedGroup(members, sorted(group.fused), token_major))
    return described

