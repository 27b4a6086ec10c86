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
from study_helpers import reference_study
from typer.testing import CliRunner

from sparselm.analysis.figures import save_figure
from sparselm.cli import app
from sparselm.study import report_figures
from sparselm.study.config import StudyConfig
from sparselm.study.report import write_report
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
