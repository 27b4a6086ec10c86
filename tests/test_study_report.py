"""The report of a real (tiny) study: figures and tables on disk, and report.html rendered in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from study_helpers import reference_study, tiny_study_yaml
from typer.testing import CliRunner

from sparselm.analysis.figures import save_figure
from sparselm.cli import app
from sparselm.study import report_figures
from sparselm.study.config import StudyConfig, load_config
from sparselm.study.report import write_report
from sparselm.study.report_data import pareto_front
from sparselm.study.run import run_study
from sparselm.study.store import ResultStore, Row

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "sparselm-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    widths: imgs.map(i => i.naturalWidth),
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    tables: document.querySelectorAll("table").length,
    height: document.body.scrollHeight,
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return reference_study(tmp_path_factory.getbasetemp() / "study-tiny")[1]


def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on this CI machine: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine: .ci/run installs it (apt-get install -y chromium)")
    return found


def headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--hide-scrollbars",
    ]
    return subprocess.run([browser(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_has_every_figure_and_table(study: Path) -> None:
    figs = {p.name for p in (study / "figs").iterdir()}
    for model in ("tiny-llama", "tiny-bert"):
        for name in ("weight-distribution", "weight-cdf", "layer-cdf", "size", "speedup"):
            assert f"{model}-{name}.png" in figs
    assert "tiny-llama-perplexity.png" in figs and "tiny-bert-wiki-pair-accuracy.png" in figs
    md = (study / "report.md").read_text()
    for fig in figs:  # the markdown links every figure, each followed by tables with the numbers
        assert f"(figs/{fig})" in md
    assert "| magnitude (global) | 0.5 |" in md and "token ppl" in md and "| accuracy |" in md
    html = (study / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(figs) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched from anywhere


def test_report_renders_in_a_real_browser(study: Path, tmp_path: Path) -> None:
    page = tmp_path / "check.html"
    page.write_text((study / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = headless(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="sparselm-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] == len(list((study / "figs").iterdir()))
    assert check["broken"] == [] and min(check["widths"]) > 100
    assert check["tables"] >= 8 and check["height"] > 2000

    shot = tmp_path / "shot.png"
    headless(tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", (study / "report.html").as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    not_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.05 < not_white < 0.9, not_white  # text and figures on a page, neither blank nor a solid block
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # anti-aliased plots and text, not a flat fill


def test_report_and_results_commands(study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    shutil.rmtree(copy / "figs")
    (copy / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").is_file() and (copy / "figs" / "tiny-llama-perplexity.png").is_file()

    rows = ResultStore.open_existing(copy).rows()
    as_json = CliRunner().invoke(app, ["results", str(copy), "--json"])
    assert [r["task"] for r in json.loads(as_json.stdout)] == [r.task for r in rows]
    as_csv = CliRunner().invoke(app, ["results", str(copy), "--csv"])
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(table) == len(rows)
    prune = next(t for t in table if t["task"] == "prune" and t["method"] == "magnitude (global)")
    assert float(prune["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3) and prune["sparsity"] == "0.5"
    shown = CliRunner().invoke(app, ["results", str(copy)])
    assert shown.exit_code == 0 and f"{len(rows)} results in" in shown.stdout and "magnitude" in shown.stdout
    missing = CliRunner().invoke(app, ["results", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "no results store" in missing.output


def bench_row(method: str, sparsity: float, prefill: dict, decode: dict | None, options: dict | None = None) -> Row:
    """A stored bench cell as `bench` reports it: speed-ups with the timing harness's spread and verdict."""
    return Row(
        model="smollm2-135m", method=method, options=options or {}, sparsity=sparsity, task="bench", kind="bench",
        status="ok", metrics={"prefill": [{"tokens": 128, **prefill}], "decode": decode}, settings={"rounds": 7},
        provenance={}, error=None, started=0.0, seconds=1.0,
    )


def spread(median: float, low: float, high: float, within_noise: bool) -> dict:
    return {"speedup": median, "speedup_low": low, "speedup_high": high, "within_noise": within_noise}


MAGNITUDE = {"scope": "global", "pattern": "unstructured", "allocation": "uniform", "include_embeddings": False}


def test_every_speedup_is_shown_with_its_spread_and_noise_verdict(tmp_path: Path, monkeypatch) -> None:
    config = StudyConfig.model_validate(
        {"models": [{"name": "smollm2-135m"}], "methods": [{"method": "magnitude"}], "sparsities": [0, 0.9, 0.95]}
    )
    store = ResultStore.open_for(tmp_path, config)
    store.record(bench_row("dense", 0.0, spread(1.004, 0.97, 1.05, True), spread(0.99, 0.95, 1.02, True)))
    store.record(bench_row("magnitude", 0.9, spread(1.86, 1.80, 1.93, False), spread(1.15, 0.98, 1.31, True), MAGNITUDE))
    store.record(bench_row("magnitude", 0.95, {"speedup": 3.12}, None, MAGNITUDE))  # stored without a spread
    drawn = []
    monkeypatch.setattr(report_figures, "save_figure", lambda fig, path, dpi: drawn.append(fig) or save_figure(fig, path, dpi))
    write_report(tmp_path)

    md = (tmp_path / "report.md").read_text()
    assert "| method | sparsity | prefill 128 tokens speedup | decode speedup |" in md
    assert "| dense | 0 | 1.00× (0.97–1.05), within noise | 0.99× (0.95–1.02), within noise |" in md
    assert "| magnitude (global) | 0.9 | 1.86× (1.80–1.93) | 1.15× (0.98–1.31), within noise |" in md
    assert "| magnitude (global) | 0.95 | 3.12× (no spread), within noise |  |" in md
    html = (tmp_path / "report.html").read_text()
    assert "<td>1.86× (1.80–1.93)</td>" in html and "<em>within noise</em>" in html

    (fig,) = drawn
    prefill, decode = fig.axes
    assert prefill.get_title() == "smollm2-135m: prefill 128 tokens" and decode.get_title() == "smollm2-135m: decode"
    (bars,) = [c for c in prefill.containers if isinstance(c, ErrorbarContainer)]
    line, _caps, (segments,) = bars
    assert list(line.get_xdata()) == [0.0, 0.9, 0.95]  # the method's line starts at the dense model
    assert list(line.get_ydata()) == [1.004, 1.86, 3.12]
    extents = [tuple(seg[:, 1]) for seg in segments.get_segments()]
    assert extents == [pytest.approx((0.97, 1.05)), pytest.approx((1.80, 1.93)), pytest.approx((3.12, 3.12))]
    (band,) = [p for p in prefill.patches if p.get_alpha() == 0.15]  # the dense model's spread as a band
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.97, 1.05))


def naive_front(points: list[tuple[float, float]]) -> set[int]:
    """The Pareto front by a sweep (fastest first, keeping each point better than every faster one): an independent
    computation of what `pareto_front` finds pairwise."""
    front, best = set(), float("inf")
    by_speed = sorted(range(len(points)), key=lambda i: -points[i][0])
    for speed in dict.fromkeys(points[i][0] for i in by_speed):
        same = [i for i in by_speed if points[i][0] == speed]
        lowest = min(points[i][1] for i in same)
        if lowest < best:
            front |= {i for i in same if points[i][1] == lowest}
            best = lowest
    return front


def test_pareto_front_keeps_exactly_the_unbeaten_points() -> None:
    points = [(1.0, 1.0), (1.5, 1.2), (1.4, 1.5), (2.0, 3.0), (2.0, 5.0), (0.9, 0.95), (1.5, 1.2), (1.0, 1.1)]
    # (1.4, 1.5) loses to (1.5, 1.2); (2.0, 5.0) to (2.0, 3.0); (1.0, 1.1) to (1.0, 1.0); equal points both stay.
    assert pareto_front(points) == [0, 1, 3, 5, 6]
    rng = np.random.default_rng(0)
    for _ in range(200):
        count = int(rng.integers(1, 12))
        sampled = [(float(rng.choice([0.8, 1.0, 1.5, 2.0, 3.0])), float(rng.choice([1.0, 1.3, 2.0, 9.0]))) for _ in range(count)]
        assert set(pareto_front(sampled)) == naive_front(sampled), sampled


def study_row(method: str, options: dict, sparsity: float, task: str, kind: str, metrics: dict, seconds: float = 1.0) -> Row:
    return Row("smollm2-135m", method, options, sparsity, task, kind, "ok", metrics, {}, {}, None, 0.0, seconds)


def bench_metrics(prefill: dict, decode: dict) -> dict:
    return {"prefill": [{"tokens": 128, **prefill}], "decode": decode}


def test_recovery_and_frontier_sections_on_synthetic_rows(tmp_path: Path, monkeypatch) -> None:
    methods = [{"method": "magnitude"}, {"method": "sparsegpt"}, {"method": "sparsegpt", "reconstruct": True, "sparsities": [0.9]}]
    config = StudyConfig.model_validate(
        {"models": [{"name": "smollm2-135m", "tasks": ["ptb"]}], "methods": methods, "sparsities": [0, 0.5, 0.9]}
    )
    magnitude, sparsegpt, recovered = (m.options() for m in config.methods)
    store = ResultStore.open_for(tmp_path, config)
    store.record(study_row("dense", {}, 0.0, "ptb", "perplexity", {"token_ppl": 50.0}))
    store.record(study_row("dense", {}, 0.0, "bench", "bench", bench_metrics(spread(1.01, 0.97, 1.04, True), spread(0.99, 0.96, 1.03, True))))
    measured = [("magnitude", magnitude, 0.5, 90.0), ("magnitude", magnitude, 0.9, 5000.0), ("sparsegpt", sparsegpt, 0.5, 70.0),
                ("sparsegpt", sparsegpt, 0.9, 800.0), ("sparsegpt", recovered, 0.9, 200.0)]
    for method, options, sparsity, ppl in measured:
        store.record(study_row(method, options, sparsity, "ptb", "perplexity", {"token_ppl": ppl}))
        store.record(study_row(method, options, sparsity, "prune", "prune", {}, seconds=12.5 if options is recovered else 4.0))
    store.record(study_row("magnitude", magnitude, 0.9, "bench", "bench", bench_metrics(spread(2.0, 1.9, 2.1, False), spread(1.3, 1.2, 1.4, False))))
    store.record(study_row("sparsegpt", sparsegpt, 0.9, "bench", "bench", bench_metrics(spread(1.9, 1.8, 2.0, False), spread(1.35, 1.25, 1.45, False))))
    store.record(study_row("sparsegpt", recovered, 0.9, "bench", "bench", bench_metrics(spread(1.95, 1.85, 2.05, False), spread(1.02, 0.95, 1.1, True))))
    drawn = {}
    monkeypatch.setattr(report_figures, "save_figure", lambda fig, path, dpi: drawn.setdefault(path.name, fig) and save_figure(fig, path, dpi))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()

    # One-shot vs recovered: 200 / 800 and 200 / 50, with both prune cells' seconds.
    assert "| sparsegpt +reconstruct | sparsegpt | 0.9 | ptb | 800 | 200 | 0.250× | 4.00× | 4.0 → 12.5 |" in md
    (axes,) = drawn["smollm2-135m-recovery.png"].axes
    lines = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"sparsegpt", "sparsegpt +reconstruct", "dense 50"}  # magnitude has no recovered variant
    assert list(lines["sparsegpt"].get_ydata()) == [50.0, 70.0, 800.0] and lines["sparsegpt"].get_linestyle() == "--"
    assert list(lines["sparsegpt +reconstruct"].get_ydata()) == [50.0, 200.0]
    assert lines["sparsegpt"].get_color() == lines["sparsegpt +reconstruct"].get_color()

    # Quality vs speed: ratio to dense 50; the decode speed-up of the recovered model is within noise, so it counts
    # as 1.0× and the dense model beats it; magnitude is the fastest at prefill, so it is on that front.
    header = "| method | sparsity | task | token ppl / dense | prefill 128 tokens speedup | decode speedup | on the Pareto front of |"
    assert header in md
    for row in [
        # dense against itself at 1.0×, with its rounds' spread relative to their median: 0.97/1.01–1.04/1.01, ...
        "| dense | 0 | ptb | 1.00× | 1.00× (0.96–1.03), within noise | 1.00× (0.97–1.04), within noise | prefill 128 tokens, decode |",
        "| magnitude (global) | 0.9 | ptb | 100× | 2.00× (1.90–2.10) | 1.30× (1.20–1.40) | prefill 128 tokens |",
        "| sparsegpt | 0.9 | ptb | 16.0× | 1.90× (1.80–2.00) | 1.35× (1.25–1.45) | decode |",
        "| sparsegpt +reconstruct | 0.9 | ptb | 4.00× | 1.95× (1.85–2.05) | 1.02× (0.95–1.10), within noise | prefill 128 tokens |",
    ]:
        assert row in md, row
    assert "| magnitude (global) | 0.5 | ptb | 1.80× |" not in md  # no latency measured: not on the frontier
    prefill, decode = drawn["smollm2-135m-frontier.png"].axes
    assert prefill.get_xlabel() == "prefill 128 tokens speedup over dense (×)" and prefill.get_yscale() == "log"
    for ax, front in ((prefill, [(1.0, 1.0), (1.95, 4.0), (2.0, 100.0)]), (decode, [(1.0, 1.0), (1.35, 16.0)])):
        (line,) = [l for l in ax.get_lines() if l.get_label() == "Pareto front"]
        assert list(line.get_xdata()) == pytest.approx([x for x, _ in front])
        assert list(line.get_ydata()) == pytest.approx([y for _, y in front])
        notes = sorted((a.get_text(), a.xy) for a in ax.texts)
        assert [n for n, _ in notes] == ["0.9", "0.9", "0.9", "dense"]
        assert dict((xy, n) for n, xy in notes)[(1.0, 1.0)] == "dense"  # the dense model at (1, 1)
    bars = {c.get_label(): c for c in prefill.containers if isinstance(c, ErrorbarContainer)}
    (xbars,) = bars["sparsegpt +reconstruct"].lines[2]
    assert [tuple(seg[:, 0]) for seg in xbars.get_segments()] == [pytest.approx((1.85, 2.05))]  # min–max over rounds
    html = (tmp_path / "report.html").read_text()
    assert "<td>sparsegpt +reconstruct</td><td>0.9</td><td>ptb</td><td>4.00×</td>" in html


@pytest.fixture(scope="module")
def recovered_study(tmp_path_factory) -> Path:
    """A tiny study with SparseGPT in one shot and with block reconstruction (at 0.9 only), every model timed."""
    root = tmp_path_factory.getbasetemp() / "study-tiny"
    config = load_config(tiny_study_yaml(
        root, "recovered", analyze="false", sparsities="[0, 0.5, 0.9]", encoder_tasks="[]", size="{enabled: false}",
        methods="[{method: sparsegpt}, {method: sparsegpt, reconstruct: true, reconstruct_epochs: 1, sparsities: [0.9]}]",
        runtime="{enabled: true, tokens: [8], threads: 1, rounds: 3, steps: 2, sparsities: [0, 0.9]}",
    ))
    out = root / "recovered"
    summary = run_study(config, out)
    assert not summary.failed, summary.failed
    return out


def test_a_study_with_a_recovered_variant_reports_it_beside_its_one_shot_method(recovered_study: Path) -> None:
    rows = ResultStore.open_existing(recovered_study).rows()
    decoder = [r for r in rows if "llama" in r.model]
    measured = {(r.method, json.dumps(r.options, sort_keys=True), r.sparsity, r.task): r for r in decoder}
    methods = load_config(recovered_study / "config.yaml").methods
    one_shot_options, recovered_options = (json.dumps(m.options(), sort_keys=True) for m in methods)
    label = methods[1].label  # "sparsegpt +reconstruct", with "(N epochs)" where N is not prune's default
    task = next(r.task for r in decoder if r.kind == "perplexity")
    prune = measured[("sparsegpt", recovered_options, 0.9, "prune")]
    assert prune.settings["reconstruct"] is True and prune.settings["reconstruct_epochs"] == 1
    assert measured[("sparsegpt", one_shot_options, 0.9, "prune")].settings["reconstruct"] is False
    assert {r.sparsity for r in decoder if json.dumps(r.options, sort_keys=True) == recovered_options} == {0.9}
    ppl = {key[0:3]: r.metrics["token_ppl"] for key, r in measured.items() if r.kind == "perplexity"}
    dense, base, rec = ppl[("dense", "{}", 0.0)], ppl[("sparsegpt", one_shot_options, 0.9)], ppl[("sparsegpt", recovered_options, 0.9)]
    assert rec != base  # the reconstruction changed the model

    figs = {p.name for p in (recovered_study / "figs").iterdir()}
    assert {"tiny-llama-recovery.png", "tiny-llama-frontier.png", "tiny-bert-frontier.png"} - figs == {"tiny-bert-frontier.png"}
    md = (recovered_study / "report.md").read_text()
    assert "(figs/tiny-llama-recovery.png)" in md and "(figs/tiny-llama-frontier.png)" in md
    # The one-shot vs recovered table, from the measured perplexities.
    assert f"| {label} | sparsegpt | 0.9 | {task} | {base:.4g} | {rec:.4g} | {rec / base:#.3g}× |" in md
    # The frontier table: every timed model's ratio to dense and its measured speed-ups (median and spread).
    assert ("sparsegpt", one_shot_options, 0.5, "bench") not in measured  # not timed, so not on the frontier
    assert f"| sparsegpt | 0.5 | {task} | {ppl[('sparsegpt', one_shot_options, 0.5)] / dense:#.3g}× |" not in md
    for method, options, sparsity in (("sparsegpt", one_shot_options, 0.9), ("sparsegpt", recovered_options, 0.9)):
        bench = measured[(method, options, sparsity, "bench")].metrics
        ratio = ppl[(method, options, sparsity)] / dense
        prefill, decode = bench["prefill"][0], bench["decode"]
        name = "sparsegpt" if options == one_shot_options else label
        cells = [name, f"{sparsity:g}", task, f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:#.3g}×",
                 *[f"{s['speedup']:.2f}× ({s['speedup_low']:.2f}–{s['speedup_high']:.2f})" + ", within noise" * s["within_noise"]
                   for s in (prefill, decode)]]
        assert "| " + " | ".join(cells) in md, cells
    html = (recovered_study / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == len(figs)
    assert "quality vs speed" in html and "one-shot vs recovered perplexity" in html
