"""The study's configuration: a YAML file validated by pydantic, every problem reported at once with its line.

The effective configuration (with `quick:` or `full:` overrides merged in by `--quick` / `--full`) is hashed; the hash ties a
results store to the study that produced it, so results of two different studies are never mixed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SparselmError
from ..evaluation.tasks import check_task, is_classification
from ..models import EMBEDDED

DEFAULT_CONFIG = "default.yaml"
# Sections that only say where and how cells run; they never change a result, so they stay out of the hash.
UNHASHED = ("resources",)
VARIANTS = ("quick", "full")  # sections of overrides merged over the rest with --quick / --full


def task_kind(task: str) -> Literal["perplexity", "classification"]:
    """Perplexity tasks are measured as they are; classification tasks are fine-tuned first."""
    return "classification" if is_classification(task) else "perplexity"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_task(task: str) -> str:
    try:
        check_task(task)
    except SparselmError as exc:
        raise ValueError(str(exc)) from None
    return task


Task = Annotated[str, AfterValidator(_known_task)]
Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of weights set to zero, in [0, 1)")]


class ModelSpec(Strict):
    """One model of the study and the tasks it is measured on."""

    name: str = Field(description="embedded alias, local model directory, or hub id org/name")
    tasks: list[Task] = Field(default_factory=list, description="ptb, wiki, wikitext2, text:PATH, wiki-pair, ...")
    finetune_max_steps: int | None = Field(None, ge=1, description="this model's fine-tuning step budget")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name in EMBEDDED or (Path(name).expanduser() / "config.json").is_file():
            return name
        if Path(name).expanduser().exists():
            raise ValueError(f"'{name}' has no config.json, so it is not a Hugging Face model directory")
        if name.count("/") == 1 and not name.startswith((".", "/", "~")):
            return name  # a hub id; fetched when the study runs
        raise ValueError(
            f"unknown model '{name}': use an embedded alias ({', '.join(EMBEDDED)}), "
            "a directory with config.json, or a hub id org/name"
        )

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return tasks


def _is_text_task(task: str) -> bool:
    return task.startswith("text:") and len(task) > 5


class MethodSpec(Strict):
    """A pruning method and its options (sparselm.pruning.PruneSettings fields other than sparsity/calibration)."""

    method: Literal["magnitude", "wanda", "sparsegpt"]
    scope: Literal["global", "layer"] | None = Field(None, description="default: global for magnitude, else layer")
    pattern: str = "unstructured"
    allocation: Literal["uniform", "owl"] = "uniform"
    include_embeddings: bool = False

    @model_validator(mode="after")
    def _default_scope_and_check(self) -> MethodSpec:
        if self.scope is None:
            object.__setattr__(self, "scope", "global" if self.method == "magnitude" else "layer")
        from ..pruning import PruneSettings  # the pruning engine decides which combinations make sense

        try:
            PruneSettings(method=self.method, **self.options())
        except SparselmError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M patterns fix the sparsity (2:4 is 0.5), so such a method is measured at that one sparsity."""
        from ..masks import NM, parse_pattern

        pattern = parse_pattern(self.pattern)
        return pattern.sparsity if isinstance(pattern, NM) else None

    def options(self) -> dict[str, Any]:
        """The options that, with the method, identify a pruned model (part of every result's key)."""
        return self.model_dump(exclude={"method"})

    @property
    def label(self) -> str:
        """A short human name: `magnitude (global)`, `wanda 2:4`, `sparsegpt +owl`."""
        parts = [self.method]
        if self.method == "magnitude" or self.scope != "layer":
            parts.append(f"({self.scope})")
        if self.pattern != "unstructured":
            parts.append(self.pattern)
        if self.allocation != "uniform":
            parts.append(f"+{self.allocation}")
        if self.include_embeddings:
            parts.append("+emb")
        return " ".join(parts)

    @property
    def slug(self) -> str:
        """A directory-safe name that differs whenever the options differ."""
        text = f"{self.method}-{self.scope}-{self.pattern}-{self.allocation}" + ("-emb" if self.include_embeddings else "")
        return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


class Calibration(Strict):
    source: str = "ptb"
    samples: int = Field(16, ge=1)
    seqlen: int | None = Field(256, ge=8)
    seed: int = 0


class Perplexity(Strict):
    split: str = "test"
    seqlen: int | None = Field(256, ge=8)
    max_windows: int | None = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)


class Classification(Strict):
    split: str = "test"
    max_examples: int | None = Field(None, ge=1, description="evaluation examples (None: the whole split)")
    batch_size: int = Field(16, ge=1)


class Finetune(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(60, ge=1)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="training examples (None: the whole split)")


class Size(Strict):
    enabled: bool = True
    format: Literal["auto", "bitmask", "csr", "compressed-tensors"] = "auto"
    dtype: Literal["keep", "fp16", "bf16"] = "keep"


class Runtime(Strict):
    enabled: bool = True
    tokens: list[int] = Field(default_factory=lambda: [1, 128])
    threads: int | None = Field(None, ge=1)
    rounds: int = Field(3, ge=1, description="timed repetitions per shape (the median is kept)")
    steps: int = Field(8, ge=1, description="decode steps per timed decode")

    @field_validator("tokens")
    @classmethod
    def _positive(cls, tokens: list[int]) -> list[int]:
        if not tokens or any(t < 1 for t in tokens):
            raise ValueError("tokens must be a non-empty list of positive token counts")
        return tokens


class CellResources(Strict):
    """What one cell asks of a Ray cluster; memory None = estimated from the model's size."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)


class Resources(Strict):
    prune: CellResources = CellResources()
    analyze: CellResources = CellResources()
    perplexity: CellResources = CellResources()
    classification: CellResources = CellResources()
    pack: CellResources = CellResources()
    bench: CellResources = CellResources()


class StudyConfig(Strict):
    """A whole study: models × methods × sparsities, with their tasks, budgets and measurements."""

    name: str = "study"
    seed: int = 0
    models: list[ModelSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    sparsities: list[Sparsity] = Field(min_length=1)
    analyze: bool = Field(True, description="weight-distribution figures of every dense model")
    calibration: Calibration = Calibration()
    perplexity: Perplexity = Perplexity()
    classification: Classification = Classification()
    finetune: Finetune = Finetune()
    size: Size = Size()
    runtime: Runtime = Runtime()
    resources: Resources = Resources()
    quick: dict[str, Any] | None = Field(None, description="overrides merged in with --quick")
    full: dict[str, Any] | None = Field(None, description="overrides merged in with --full (the full-size study)")

    @field_validator("sparsities")
    @classmethod
    def _distinct_sparsities(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values):
            raise ValueError("a sparsity is listed twice")
        return sorted(values)

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: list[MethodSpec]) -> list[MethodSpec]:
        if len({m.slug for m in methods}) != len(methods):
            raise ValueError("a method with the same options is listed twice")
        return methods

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        if len({m.name for m in models}) != len(models):
            raise ValueError("a model is listed twice")
        return models

    def hashed_json(self) -> dict[str, Any]:
        """The part of the configuration that determines results (no variant sections, no resources)."""
        return self.model_dump(mode="json", exclude={*VARIANTS, *UNHASHED})

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.hashed_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def finetune_steps(self, model: ModelSpec) -> int | None:
        return model.finetune_max_steps or self.finetune.max_steps


def default_config_text() -> str:
    """The shipped default study (the seed's lab on the embedded models), as YAML with comments."""
    return resources.files("sparselm.study").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")


def load_config(path: Path | None, variant: str | None = None) -> StudyConfig:
    """Read, validate and merge a variant's overrides (`quick`, `full`); every problem is reported at once with its line."""
    if path is None:
        text, where, base = default_config_text(), f"(default config {DEFAULT_CONFIG})", Path.cwd()
    else:
        path = Path(path)
        if not path.is_file():
            raise SparselmError(f"no config file at '{path}'; pass an existing YAML file (or none for the default)")
        text, where, base = path.read_text(encoding="utf-8"), str(path), path.resolve().parent
    return parse_config(text, where, base, variant)


def parse_config(text: str, where: str, base: Path, variant: str | None = None) -> StudyConfig:
    """Validate YAML text; relative model directories and text: paths are taken relative to `base`."""
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise SparselmError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SparselmError(f"{where} must be a YAML mapping with at least models, methods and sparsities")
    raw = _resolve_paths(raw, base)
    problems = _validate(raw, root, ())
    merged = {}
    for name in VARIANTS:  # every variant is checked whichever runs, so a broken one never waits to be found
        overrides = raw.get(name)
        if isinstance(overrides, dict):
            merged[name] = _merge(raw, _resolve_paths(overrides, base))
            problems += [p for p in _validate(merged[name], root, (name,), overrides) if f": {name}." in p]
    if problems:
        listing = "\n".join(f"  {where}:{p}" for p in problems)
        raise SparselmError(f"invalid study config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{listing}")
    if variant is None:
        return StudyConfig.model_validate(raw)
    if variant not in merged:
        raise SparselmError(f"{where} has no `{variant}:` section, so --{variant} has nothing to apply; add one or drop --{variant}")
    return StudyConfig.model_validate(merged[variant])


def _validate(raw: dict[str, Any], root: yaml.Node, prefix: tuple, overrides: Any = None) -> list[str]:
    """All validation problems as 'line: path: message' strings (empty when valid)."""
    try:
        StudyConfig.model_validate(raw)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # drop union-branch tags
            path = prefix + loc if prefix and _has_path(overrides, loc) else loc
            line = _line_of(root, path)
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key '{loc[-1]}'"
            out.append(f"{line}: {'.'.join(str(p) for p in path) or '(top level)'}: {message}")
        return out
    return []


def _has_path(obj: Any, path: tuple) -> bool:
    for part in path:
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and isinstance(part, int) and part < len(obj):
            obj = obj[part]
        else:
            return False
    return True


def _line_of(node: yaml.Node | None, path: tuple) -> int:
    """The 1-based line of the deepest node of `path` that exists in the YAML document (a key's line for keys)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by the override."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative model directories and text: tasks absolute, so the study does not depend on the cwd."""
    raw = copy.deepcopy(raw)
    for model in raw.get("models") or []:
        if not isinstance(model, dict):
            continue
        name = model.get("name")
        if isinstance(name, str) and name not in EMBEDDED and (base / Path(name).expanduser() / "config.json").is_file():
            model["name"] = str((base / Path(name).expanduser()).resolve())
        tasks = model.get("tasks")
        if isinstance(tasks, list):
            model["tasks"] = [
                f"text:{(base / Path(t[5:]).expanduser()).resolve()}" if isinstance(t, str) and _is_text_task(t) else t
                for t in tasks
            ]
    return raw
