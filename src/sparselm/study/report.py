"""The study's report: figures in DIR/figs/, DIR/report.md (linking them) and DIR/report.html (figures embedded).

Everything is drawn from the results store, so `sparselm report DIR` can be run at any time, on a finished study or
on one still running. `report_data` decides what is shown, `report_figures` draws it, and the Jinja2 templates in
`templates/` lay it out.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from ..io import atomic_write_text, ensure_writable_dir
from .report_data import FigureData, ReportData, report_data
from .store import ResultStore

FIGS_DIR = "figs"
TEMPLATES = ("report.md.j2", "report.html.j2")


def write_report(out: Path) -> Path:
    """Draw every figure and write report.md and report.html; returns the HTML path."""
    out = Path(out)
    store = ResultStore.open_existing(out)
    data = report_data(store.meta(), store.rows(), out)
    figs = ensure_writable_dir(out / FIGS_DIR)
    from .report_figures import draw_figure  # matplotlib is imported only when a report is drawn

    drawn = {f.name: draw_figure(f, figs) for s in data.sections for f in s.figures}
    markdown, html = (render(name, data, drawn, out) for name in TEMPLATES)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", html)
    return out / "report.html"


def render(template: str, data: ReportData, drawn: dict[str, Path], out: Path) -> str:
    """One template over the report's sections; figures are linked (Markdown) or inlined as data: URIs (HTML)."""

    def figure_path(figure: FigureData) -> str:
        return drawn[figure.name].relative_to(out).as_posix()

    def figure_data_uri(figure: FigureData) -> str:
        return "data:image/png;base64," + base64.b64encode(drawn[figure.name].read_bytes()).decode("ascii")

    return _environment(template.endswith(".html.j2")).get_template(template).render(
        title=data.title, sections=data.sections, figure_path=figure_path, figure_data_uri=figure_data_uri
    )


def _environment(html: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sparselm.study", "templates"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["md_cell"] = lambda cell: str(cell).replace("|", "/")
    env.filters["inline_markup"] = _inline_markup
    return env


def _inline_markup(text: str) -> Markup:
    """A text's `code` and *emphasis*, escaped for HTML."""
    escaped = str(escape(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return Markup(re.sub(r"\*([^*]+)\*", r"<em>\1</em>", escaped))
