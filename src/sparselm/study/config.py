"""The study's configuration: a YAML file validated by pydantic, every problem reported at once with its line.

The effective configuration (with `quick:` or `full:` overrides merged in by `--quick` / `--full`) is hashed; the hash ties a
results store to the study that produced it, so results of two different studies are never mixed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from ..errors import SparselmError
from ..evaluation.tasks import check_task, is_classification
from ..facts import CONFIG_JSON
from ..pruning.settings import PruneSettings, settings_from
from ..sources import EMBEDDED, reference_kind
from ..storage import FORMATS
from ..storage.pack import DTYPES

DEFAULT_CONFIG = "default.yaml"
# Sections that only say where and how cells run; they never change a result, so they stay out of the hash.
UNHASHED = ("resources",)
VARIANTS = ("quick", "full")  # sections of overrides merged over the rest with --quick / --full


class CellKind(StrEnum):
    """What a cell does; the study's one list of them (runners, Ray resources and the report all key on it)."""

    ANALYZE = "analyze"
    PRUNE = "prune"
    PERPLEXITY = "perplexity"
    CLASSIFICATION = "classification"
    PACK = "pack"
    BENCH = "bench"


# Kinds whose cell's task is the kind's own name; the other kinds' cells are named after their evaluation task.
NAMED_BY_KIND = (CellKind.ANALYZE, CellKind.PRUNE, CellKind.PACK, CellKind.BENCH)


def task_kind(task: str) -> CellKind:
    """Perplexity tasks are measured as they are; classification tasks are fine-tuned first."""
    return CellKind.CLASSIFICATION if is_classification(task) else CellKind.PERPLEXITY


def cell_kind(task: str) -> CellKind:
    """The kind of the cell named `task`: analyze, prune, pack and bench by name, an evaluation task by its kind."""
    return CellKind(task) if task in NAMED_BY_KIND else task_kind(task)


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

    name: str = Field(description="embedded alias, local model directory, or hub id (gpt2, org/name)")
    tasks: list[Task] = Field(default_factory=list, description="ptb, wiki, wikitext2, text:PATH, wiki-pair, ...")
    finetune_max_steps: int | None = Field(None, ge=1, description="this model's fine-tuning step budget")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        """The rule every command applies (sparselm.sources.reference_kind); a hub id is fetched when the study runs."""
        try:
            reference_kind(name)
        except SparselmError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return tasks


def _prune_settings(**fields: Any) -> PruneSettings:
    try:
        return settings_from(**fields)
    except SparselmError as exc:
        raise ValueError(str(exc)) from None


def _is_text_task(task: str) -> bool:
    return task.startswith("text:") and len(task) > 5


# The recovery options of a method and the values that mean "one-shot": left out of the method's serialised form (and
# so of its key, its directory name and the config hash), so a one-shot method is identified exactly as before recovery
# options existed, and the stores of earlier studies stay valid. `sparsities` is the study's, not pruning's, option.
ONE_SHOT = {"reconstruct": False, "reconstruct_epochs": None, "reconstruct_lr": None, "steps": 1}
STUDY_ONLY = {"sparsities": None}
UNSTATED = {**ONE_SHOT, **STUDY_ONLY}  # options left out of the serialised form when they have these values


class MethodSpec(Strict):
    """A pruning method and its options: PruneSettings fields (other than sparsity and calibration), checked by
    PruneSettings itself, so the study accepts exactly the methods, scopes, patterns, allocations and recoveries
    `prune` does.

    A recovered variant (`reconstruct: true`, gradual `steps: K`) is a method of its own: its own label, key and
    directory. When reconstructing, the epochs and learning rate are always part of its identity (filled in from
    `prune`'s defaults when not given), so a later change of those defaults never passes old results off as new ones.
    """

    method: str
    scope: str | None = Field(None, description="default: global for magnitude, else layer")
    pattern: str = "unstructured"
    allocation: str = "uniform"
    include_embeddings: bool = False
    reconstruct: bool = Field(False, description="train each block's kept weights towards the dense block (prune --reconstruct)")
    reconstruct_epochs: int | None = Field(None, description="passes over the calibration batches per block (default: prune's)")
    reconstruct_lr: float | None = Field(None, description="Adam learning rate of the reconstruction (default: prune's)")
    steps: int = Field(1, description="gradual pruning in this many rounds (prune --steps; 1 = one shot)")
    sparsities: list[Sparsity] | None = Field(
        None, min_length=1, description="prune this method at these of the study's sparsities only (None: all of them)"
    )

    @field_validator("method", "scope", "pattern", "allocation", "include_embeddings", "reconstruct_epochs", "reconstruct_lr")
    @classmethod
    def _valid_prune_setting(cls, value: Any, info: ValidationInfo) -> Any:
        """Each option on its own, as PruneSettings reads it (patterns come back normalised: `2:4`); `steps` depends on
        the method, so the combination check below judges it."""
        if value is None:
            return value
        return getattr(_prune_settings(**{info.field_name: value}), info.field_name)

    @field_validator("sparsities")
    @classmethod
    def _distinct_positive(cls, values: list[float] | None) -> list[float] | None:
        if values is None:
            return None
        if len(set(values)) != len(values) or 0.0 in values:
            raise ValueError("list each sparsity once, without 0 (the dense model is measured once per model)")
        return sorted(values)

    @model_validator(mode="after")
    def _default_scope_and_check(self) -> MethodSpec:
        if self.scope is None:
            object.__setattr__(self, "scope", "global" if self.method == "magnitude" else "layer")
        if not self.reconstruct and (self.reconstruct_epochs is not None or self.reconstruct_lr is not None):
            raise ValueError("reconstruct_epochs and reconstruct_lr tune the reconstruction: add `reconstruct: true` or drop them")
        if self.reconstruct:
            defaults = _prune_settings()
            for name in ("reconstruct_epochs", "reconstruct_lr"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(defaults, name))
        if self.sparsities is not None and self.fixed_sparsity is not None:
            raise ValueError(f"pattern {self.pattern} fixes the sparsity at {self.fixed_sparsity:g}; drop `sparsities`")
        _prune_settings(method=self.method, **self.options())  # the combination, as the pruning engine judges it
        return self

    @model_serializer(mode="wrap")
    def _without_one_shot_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k not in UNSTATED or v != UNSTATED[k]}

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M patterns fix the sparsity (2:4 is 0.5), so such a method is measured at that one sparsity."""
        from ..masks import NM, parse_pattern

        pattern = parse_pattern(self.pattern)
        return pattern.sparsity if isinstance(pattern, NM) else None

    def options(self) -> dict[str, Any]:
        """The options that, with the method, identify a pruned model (part of every result's key)."""
        return self.model_dump(exclude={"method", *STUDY_ONLY})

    def recovery(self) -> dict[str, Any]:
        """The PruneSettings fields of this method's recovery, stated in full (one-shot too, so a change of `prune`'s
        defaults never turns a one-shot method into a recovered one)."""
        fields = {"reconstruct": self.reconstruct, "steps": self.steps}
        if self.reconstruct:
            fields.update(reconstruct_epochs=self.reconstruct_epochs, reconstruct_lr=self.reconstruct_lr)
        return fields

    @property
    def recovered(self) -> bool:
        """Whether the pruned model recovers towards the dense one (reconstruction, or gradual rounds)."""
        return self.reconstruct or self.steps > 1

    @property
    def one_shot(self) -> MethodSpec:
        """The same method and options without recovery: what a recovered variant is compared with."""
        kept = {k: v for k, v in self.options().items() if k not in ONE_SHOT}
        return MethodSpec(method=self.method, **kept)

    @property
    def label(self) -> str:
        """A short human name: `magnitude (global)`, `wanda 2:4`, `sparsegpt +owl`, `sparsegpt +reconstruct`."""
        parts = [self.method]
        if self.method == "magnitude" or self.scope != "layer":
            parts.append(f"({self.scope})")
        if self.pattern != "unstructured":
            parts.append(self.pattern)
        if self.allocation != "uniform":
            parts.append(f"+{self.allocation}")
        if self.include_embeddings:
            parts.append("+emb")
        if self.reconstruct:
            parts.append("+reconstruct" + self._reconstruct_detail())
        if self.steps > 1:
            parts.append(f"+{self.steps} steps")
        return " ".join(parts)

    def _reconstruct_detail(self) -> str:
        """`(3 epochs, lr 0.0001)` for the settings that differ from `prune`'s defaults, else nothing."""
        defaults = _prune_settings()
        detail = []
        if self.reconstruct_epochs != defaults.reconstruct_epochs:
            detail.append(f"{self.reconstruct_epochs} epoch{'s' * (self.reconstruct_epochs != 1)}")
        if self.reconstruct_lr != defaults.reconstruct_lr:
            detail.append(f"lr {self.reconstruct_lr:g}")
        return f"({', '.join(detail)})" if detail else ""

    @property
    def slug(self) -> str:
        """A directory-safe name that differs whenever the options differ (one-shot methods' names predate recovery)."""
        text = f"{self.method}-{self.scope}-{self.pattern}-{self.allocation}" + ("-emb" if self.include_embeddings else "")
        if self.reconstruct:
            text += f"-rec{self.reconstruct_epochs}x{self.reconstruct_lr:g}"
        if self.steps > 1:
            text += f"-steps{self.steps}"
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
    """`sparselm pack` of every model: any format and dtype that `pack` accepts."""

    enabled: bool = True
    format: str = "auto"
    dtype: str = "keep"

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format '{value}'; use one of: {', '.join(FORMATS)}")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype '{value}'; use one of: {', '.join(DTYPES)}")
        return value


class Runtime(Strict):
    """Dense vs accelerated latency (`sparselm bench`), timed in alternating rounds; a median with its spread."""

    enabled: bool = True
    tokens: list[int] = Field(default_factory=lambda: [1, 128])
    threads: int | None = Field(None, ge=1)
    rounds: int = Field(7, ge=1, description="alternating dense/accelerated rounds per shape (median and min–max kept)")
    steps: int = Field(16, ge=1, description="decode steps per timed decode")
    sparsities: list[Sparsity] | None = Field(
        None, description="time only the models pruned to these sparsities (None: every sparsity of the study)"
    )

    def times(self, sparsity: float) -> bool:
        """Whether the models at this sparsity get a latency cell (0 is the dense model)."""
        return self.enabled and (self.sparsities is None or any(abs(sparsity - s) < 1e-9 for s in self.sparsities))

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


# One optional section per kind of cell (`resources: {prune: {cpus: 2}}`), generated from CellKind.
Resources = create_model(
    "Resources",
    __base__=Strict,
    __doc__="What each kind of cell asks of a Ray cluster.",
    **{kind.value: (CellResources, CellResources()) for kind in CellKind},
)


def resources_of(resources: BaseModel, kind: CellKind) -> CellResources:
    return getattr(resources, kind.value)


class StudyConfig(Strict):
    """A whole study: models × methods × sparsities, with their tasks, budgets and measurements."""

    name: str = "study"
    seed: int = 0
    models: list[ModelSpec] = Field(min_length=1)
    sparsities: list[Sparsity] = Field(min_length=1)  # before methods, whose own sparsities are checked against it
    methods: list[MethodSpec] = Field(min_length=1)
    analyze: bool = Field(True, description="weight-distribution figures of every dense model")
    calibration: Calibration = Calibration()
    perplexity: Perplexity = Perplexity()
    classification: Classification = Classification()
    finetune: Finetune = Finetune()
    size: Size = Size()
    runtime: Runtime = Runtime()
    resources: Resources = Resources()  # type: ignore[valid-type]
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
    def _distinct_methods(cls, methods: list[MethodSpec], info: ValidationInfo) -> list[MethodSpec]:
        if len({m.slug for m in methods}) != len(methods):
            raise ValueError("a method with the same options is listed twice")
        study = info.data.get("sparsities")  # absent when the study's own list is invalid (reported there)
        for i, method in enumerate(methods):
            extra = [s for s in method.sparsities or [] if study is not None and s not in study]
            if extra:
                raise ValueError(
                    f"method {i} ({method.label}) lists sparsities {', '.join(f'{s:g}' for s in extra)} that the study "
                    f"does not have ({', '.join(f'{s:g}' for s in study)}); add them to `sparsities` or drop them here"
                )
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
    """The shipped default study of the embedded models, as YAML with comments."""
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
        if isinstance(name, str) and name not in EMBEDDED and (base / Path(name).expanduser() / CONFIG_JSON).is_file():
            model["name"] = str((base / Path(name).expanduser()).resolve())
        tasks = model.get("tasks")
        if isinstance(tasks, list):
            model["tasks"] = [
                f"text:{(base / Path(t[5:]).expanduser()).resolve()}" if isinstance(t, str) and _is_text_task(t) else t
                for t in tasks
            ]
    return raw
