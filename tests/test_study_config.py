"""Study configs: the shipped default, quick overrides, and every problem of a bad file listed at once with its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.errors import SparselmError
from sparselm.sources import reference_kind
from sparselm.pruning import registered_methods
from sparselm.pruning.settings import settings_from
from sparselm.storage import FORMATS
from sparselm.study.cells import RUNNERS, Cell, method_spec, model_dir, plan, prune_settings
from sparselm.study.config import CellKind, MethodSpec, StudyConfig, default_config_text, load_config, parse_config
from sparselm.study.store import canonical


def test_default_config_is_the_seed_study() -> None:
    config = load_config(None)
    assert [m.name for m in config.models] == ["smollm2-135m", "minilm-l6"]
    assert config.sparsities == [0.0, 0.1, 0.5, 0.9, 0.95, 0.99]
    assert [(m.method, m.scope) for m in config.methods] == [
        ("magnitude", "global"), ("wanda", "layer"), ("sparsegpt", "layer"), ("sparsegpt", "layer"),
    ]
    # One-shot methods at every sparsity; SparseGPT + block reconstruction beside them at 0.5 and 0.9 only.
    assert [m.label for m in config.methods] == ["magnitude (global)", "wanda", "sparsegpt", "sparsegpt +reconstruct(4 epochs)"]
    assert [m.sparsities for m in config.methods] == [None, None, None, [0.5, 0.9]]
    assert config.methods[3].one_shot == config.methods[2]
    decoder, encoder = config.models
    assert decoder.tasks == ["ptb", "wiki"] and encoder.tasks == ["wiki-pair"]
    assert load_config(None, "full").models[0].tasks == ["ptb", "wiki", "wiki-pair"]  # the decoder fine-tuned too
    assert config.size.enabled and config.runtime.enabled
    # Timed as benchmarks/runtime_speed.py times (7 alternating rounds, 16 decode steps), at fewer sparsities.
    assert (config.runtime.rounds, config.runtime.steps, config.runtime.sparsities) == (7, 16, [0.0, 0.9, 0.95])
    assert load_config(None, "full").runtime.sparsities is None
    timed = [c for c in plan(config) if c.kind == CellKind.BENCH]
    # per model: the dense model, three one-shot methods at 0.9 and 0.95, and the recovered variant at 0.9
    assert len(timed) == 2 * (1 + 3 * 2 + 1)
    assert {c.sparsity for c in timed if c.options == canonical(config.methods[3].options())} == {0.9}
    # The shipped file is readable YAML a user can copy (comments included).
    assert "# The default sparselm study" in default_config_text()


def test_quick_merges_overrides_and_changes_the_hash() -> None:
    full, quick = load_config(None), load_config(None, "quick")
    assert quick.sparsities == [0.0, 0.9]
    assert quick.perplexity.seqlen == 128 and quick.perplexity.batch_size == full.perplexity.batch_size  # key by key
    assert quick.hash != full.hash
    assert len(plan(quick)) < len(plan(full))


def test_plan_puts_every_cell_after_its_prune_cell() -> None:
    cells = plan(load_config(None))
    seen = set()
    for cell in cells:
        assert cell.key not in seen
        if cell.prune_cell is not None:
            assert cell.prune_cell.key in seen
        seen.add(cell.key)
    dense = [c for c in cells if c.method == "dense"]
    assert {c.sparsity for c in dense} == {0.0}  # the dense baseline is measured once per model, not per method
    assert {c.task for c in dense if "minilm" in c.model} == {"analyze", "wiki-pair", "pack", "bench"}


BAD = """\
name: broken
models:
  - name: ./no-such-model
    tasks:
      - ptb
      - translation
  - name: minilm-l6
    taks: [wiki-pair]
methods:
  - method: magnitude
    scope: global
  - method: obs
sparsities: [0, 0.5, 1.2]
perplexity: {seqlen: 128, windows: 4}
quick:
  sparsities: [-0.1]
"""


def test_bad_config_lists_every_problem_with_its_line() -> None:
    with pytest.raises(SparselmError) as err:
        parse_config(BAD, "bad.yaml", Path("."))
    message = str(err.value)
    expected = [
        "bad.yaml:3: models.0.name: no model directory at './no-such-model'",
        "bad.yaml:6: models.0.tasks.1: unknown task 'translation'",
        "bad.yaml:8: models.1.taks: unknown key 'taks'",
        "bad.yaml:12: methods.1.method:",
        "bad.yaml:13: sparsities.2: Input should be less than 1",
        "bad.yaml:14: perplexity.windows: unknown key 'windows'",
        "bad.yaml:16: quick.sparsities.0: Input should be greater than or equal to 0",
    ]
    for line in expected:
        assert line in message, (line, message)
    assert "(7 problems)" in message


def test_missing_sections_and_non_mapping() -> None:
    with pytest.raises(SparselmError, match=r"x.yaml:1: models: Field required"):
        parse_config("methods: [{method: magnitude}]\nsparsities: [0.5]\n", "x.yaml", Path("."))
    with pytest.raises(SparselmError, match="must be a YAML mapping"):
        parse_config("- 1\n- 2\n", "x.yaml", Path("."))
    with pytest.raises(SparselmError, match="not valid YAML"):
        parse_config("models: [\n", "x.yaml", Path("."))


def test_quick_without_section_is_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump({"models": [{"name": "minilm-l6"}], "methods": [{"method": "magnitude"}], "sparsities": [0.5]})
    (tmp_path / "s.yaml").write_text(text)
    assert load_config(tmp_path / "s.yaml").sparsities == [0.5]
    with pytest.raises(SparselmError, match="no `quick:` section"):
        load_config(tmp_path / "s.yaml", "quick")


def test_relative_model_dirs_are_taken_from_the_config_file(tmp_path: Path, tiny_dir) -> None:
    model = tiny_dir("bert")
    (tmp_path / "cfg").mkdir()
    rel = Path("..") / model.relative_to(tmp_path)
    text = f"models: [{{name: {rel}}}]\nmethods: [{{method: magnitude}}]\nsparsities: [0.5]\n"
    (tmp_path / "cfg" / "s.yaml").write_text(text)
    assert load_config(tmp_path / "cfg" / "s.yaml").models[0].name == str(model.resolve())


def test_cli_reports_all_problems_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    result = CliRunner().invoke(app, ["study", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "7 problems" in result.output and "bad.yaml:8: models.1.taks: unknown key 'taks'" in result.output
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    printed = CliRunner().invoke(app, ["study", "--print-default"])
    assert printed.exit_code == 0 and printed.stdout == default_config_text()


def study(**changes) -> dict:
    return {"models": [{"name": "minilm-l6"}], "methods": [{"method": "magnitude"}], "sparsities": [0.5], **changes}


def problems(raw: dict) -> str:
    """The config problems of `raw` (empty when it is valid)."""
    try:
        parse_config(yaml.safe_dump(raw), "s.yaml", Path("."))
    except SparselmError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "openai-community/gpt2", "a/b/c", "./missing", "~/nope"])
def test_model_names_follow_the_rule_every_command_applies(name: str) -> None:
    """A name `sparselm prune` accepts (sparselm.sources.reference_kind) is valid in a study, with the same message otherwise."""
    try:
        kind = reference_kind(name)
    except SparselmError as exc:
        assert f"models.0.name: {exc}" in problems(study(models=[{"name": name}]))
    else:
        assert kind == "hub" and problems(study(models=[{"name": name}])) == ""


def test_a_file_or_a_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "is a file, not a model directory" in problems(study(models=[{"name": str(tmp_path / "weights.bin")}]))
    assert "has no config.json" in problems(study(models=[{"name": str(tmp_path)}]))


def test_methods_and_their_options_are_pruning_settings() -> None:
    """Every method PruneSettings knows is a study method; options are checked and normalised by PruneSettings."""
    for method in registered_methods():
        spec = MethodSpec(method=method)
        assert spec.scope == ("global" if method == "magnitude" else "layer")
        settings_from(method=method, **spec.options())  # the study's options are valid pruning settings as they are
    spelled = " Block:16X16 "
    assert MethodSpec(method="wanda", pattern=spelled).pattern == "block:16x16" == settings_from(pattern=spelled).pattern
    for bad, field in ((study(methods=[{"method": "obs"}]), "method"), (study(methods=[{"method": "wanda", "scope": "glob"}]), "scope")):
        with pytest.raises(SparselmError) as err:
            settings_from(**bad["methods"][0])
        assert f"methods.0.{field}: {err.value}" in problems(bad)
    # A combination PruneSettings refuses is refused with its own reason.
    with pytest.raises(SparselmError) as err:
        settings_from(method="wanda", scope="global")
    assert str(err.value) in problems(study(methods=[{"method": "wanda", "scope": "global"}]))


def test_size_accepts_every_pack_format_and_dtype() -> None:
    for name in FORMATS:
        assert problems(study(size={"format": name})) == "", name
    assert "rice" in FORMATS
    message = problems(study(size={"format": "zip", "dtype": "fp8"}))
    assert f"size.format: unknown format 'zip'; use one of: {', '.join(FORMATS)}" in message
    assert "size.dtype: unknown dtype 'fp8'; use one of: keep, fp16, bf16" in message


def test_cell_kinds_are_one_list() -> None:
    """Every kind has its runner and its Ray resources section; every planned cell's kind is one of them."""
    assert set(RUNNERS) == set(CellKind)
    assert set(StudyConfig.model_fields["resources"].annotation.model_fields) == {k.value for k in CellKind}
    config = load_config(None)
    assert {c.kind for c in plan(config)} == set(CellKind)
    assert Cell("m", "dense", "{}", 0.0, "wiki-pair").kind is CellKind.CLASSIFICATION
    assert Cell("m", "dense", "{}", 0.0, "ptb").kind is CellKind.PERPLEXITY
    assert "resources.compile: unknown key 'compile'" in problems(study(resources={"compile": {"cpus": 1}}))


def test_runtime_sparsities_choose_the_timed_models() -> None:
    config = StudyConfig.model_validate(
        study(sparsities=[0, 0.5, 0.9], methods=[{"method": "magnitude"}, {"method": "wanda", "pattern": "2:4"}],
              runtime={"sparsities": [0, 0.9]})
    )
    timed = {(c.method, c.sparsity) for c in plan(config) if c.kind == CellKind.BENCH}
    assert timed == {("dense", 0.0), ("magnitude", 0.9)}  # 2:4 is at 0.5, which is not timed
    packed = {(c.method, c.sparsity) for c in plan(config) if c.kind == CellKind.PACK}
    assert packed == {("dense", 0.0), ("magnitude", 0.5), ("magnitude", 0.9), ("wanda", 0.5)}


RECOVERED = """\
models:
  - name: minilm-l6
sparsities: [0, 0.5, 0.9]
methods:
  - method: sparsegpt
  - method: sparsegpt
    reconstruct: true
    sparsities: [0.9]
  - {method: sparsegpt, reconstruct: true, reconstruct_epochs: 3, reconstruct_lr: 1.0e-4}
  - {method: sparsegpt, steps: 4}
  - {method: wanda, reconstruct: true, steps: 2}
"""


def test_recovered_variants_are_methods_of_their_own() -> None:
    config = parse_config(RECOVERED, "r.yaml", Path("."))
    one_shot, recovered, tuned, gradual, wanda = config.methods
    assert [m.label for m in config.methods] == [
        "sparsegpt", "sparsegpt +reconstruct", "sparsegpt +reconstruct(3 epochs, lr 0.0001)", "sparsegpt +4 steps",
        "wanda +reconstruct +2 steps",
    ]
    assert len({m.slug for m in config.methods}) == len({canonical(m.options()) for m in config.methods}) == 5
    # Reconstruction's epochs and learning rate are stated in the identity even when left at prune's defaults.
    defaults = settings_from()
    assert recovered.options() == {**one_shot.options(), "reconstruct": True,
                                   "reconstruct_epochs": defaults.reconstruct_epochs, "reconstruct_lr": defaults.reconstruct_lr}
    assert gradual.options() == {**one_shot.options(), "steps": 4}
    assert [m.recovered for m in config.methods] == [False, True, True, True, True]
    assert {m.one_shot for m in config.methods[:4]} == {one_shot} and wanda.one_shot == MethodSpec(method="wanda")
    # Each prune cell's settings are what `sparselm prune --reconstruct --reconstruct-epochs 3 ...` runs.
    prunes = {(method_spec(c).label, c.sparsity): prune_settings(c, config) for c in plan(config) if c.task == "prune"}
    assert set(prunes) == {(m.label, s) for m in config.methods for s in ((0.9,) if m is recovered else (0.5, 0.9))}
    tuned_settings = prunes[(tuned.label, 0.5)]
    assert (tuned_settings.reconstruct, tuned_settings.reconstruct_epochs, tuned_settings.reconstruct_lr) == (True, 3, 1e-4)
    assert (prunes[(gradual.label, 0.9)].steps, prunes[(gradual.label, 0.9)].reconstruct) == (4, False)
    assert not prunes[("sparsegpt", 0.5)].reconstruct and prunes[("sparsegpt", 0.5)].steps == 1
    # Every prune cell has its own model directory and key; one key per measurement, no two methods sharing one.
    cells = plan(config)
    assert len({c.key for c in cells}) == len(cells)
    dirs = {model_dir(Path("/s"), c) for c in cells if c.task == "prune"}
    assert len(dirs) == len(prunes)


def test_one_shot_methods_keep_the_identity_they_had_before_recovery() -> None:
    """A config without recovered variants hashes, keys and names its models exactly as before recovery options
    existed, so earlier results stores and model directories stay valid."""
    config = StudyConfig.model_validate({
        "models": [{"name": "smollm2-135m", "tasks": ["ptb"]}], "methods": [{"method": "sparsegpt"}, {"method": "magnitude"}],
        "sparsities": [0, 0.5],
    })
    assert config.hash == "3f1fb7fb469b905a"  # the hash sparselm gave this config before recovered variants existed
    assert [set(m) for m in config.hashed_json()["methods"]] == [
        {"method", "scope", "pattern", "allocation", "include_embeddings"}] * 2
    assert MethodSpec(method="sparsegpt").slug == "sparsegpt-layer-unstructured-uniform"
    with_recovery = StudyConfig.model_validate({**config.hashed_json(), "methods": [
        *config.hashed_json()["methods"], {"method": "sparsegpt", "reconstruct": True}]})
    assert with_recovery.hash != config.hash
    # A store written before is reopened by the same config; the recovered variant's is another study.
    assert StudyConfig.model_validate(config.model_dump(mode="json")).hash == config.hash


@pytest.mark.parametrize(("method", "expected"), [
    ({"method": "wanda", "reconstruct_epochs": 3}, "methods.0: reconstruct_epochs and reconstruct_lr tune the reconstruction: add `reconstruct: true`"),
    ({"method": "sparsegpt", "reconstruct": True, "reconstruct_epochs": 0}, "methods.0.reconstruct_epochs: --reconstruct-epochs must be at least 1, got 0"),
    ({"method": "sparsegpt", "reconstruct": True, "reconstruct_lr": -1}, "methods.0.reconstruct_lr: --reconstruct-lr must be a positive learning rate"),
    ({"method": "sparsegpt", "steps": 0}, "methods.0: --steps must be at least 1"),
    ({"method": "magnitude", "scope": "layer", "steps": 3}, "methods.0: --steps needs a recovery between rounds, and magnitude does not update"),
    ({"method": "magnitude", "steps": 3, "reconstruct": True}, "methods.0: --steps prunes each block in rounds, but --scope global"),
    ({"method": "wanda", "pattern": "2:4", "sparsities": [0.5]}, "methods.0: pattern 2:4 fixes the sparsity at 0.5; drop `sparsities`"),
    ({"method": "wanda", "sparsities": [0, 0.5]}, "methods.0.sparsities: list each sparsity once, without 0"),
    ({"method": "wanda", "sparsities": [0.7]}, "methods: method 0 (wanda) lists sparsities 0.7 that the study does not have (0, 0.5)"),
    ({"method": "wanda", "reconstruct": "maybe"}, "methods.0.reconstruct: Input should be a valid boolean"),
])
def test_bad_recovered_variants_are_refused_with_their_line(method: dict, expected: str) -> None:
    raw = study(methods=[method], sparsities=[0, 0.5])
    message = problems(raw)
    assert expected in message and "(1 problem)" in message, message
    lines = yaml.safe_dump(raw).splitlines()  # the text `problems` validates
    number, path = re.search(r"s\.yaml:(\d+): (methods[.\w]*):", message).groups()
    named = lines[int(number) - 1]
    key = path.split(".")[-1]
    if key == "methods":
        assert named.startswith("methods:")
    elif key == "0":
        assert named.startswith("- ")  # the method's own entry
    else:
        assert named.lstrip("- ").startswith(f"{key}:"), (named, path)


def test_the_same_recovered_variant_twice_is_refused() -> None:
    epochs = settings_from().reconstruct_epochs  # prune's default, stated or not, is the same variant
    twice = [{"method": "sparsegpt", "reconstruct": True},
             {"method": "sparsegpt", "reconstruct": True, "reconstruct_epochs": epochs}]
    assert "a method with the same options is listed twice" in problems(study(methods=twice))
    other = {"method": "sparsegpt", "reconstruct": True, "reconstruct_epochs": epochs + 2}
    assert problems(study(methods=[twice[0], other])) == ""
