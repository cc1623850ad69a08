"""The HTML report renders in a real browser: every figure draws, nothing is empty, no JS error.

Runs headless Chromium (found on PATH; skipped when there is none) on a copy of a report made from a
tiny model, with two small scripts added: one records errors before plotly.js loads, one writes what
each plot drew into a <pre> once the page has settled. `--dump-dom` then prints the page.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from streamlens.model import load_model
from streamlens.pages.report import standard_report
from streamlens.testing import tiny_model_folder

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")]

RECORD_ERRORS = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.map(String).join(" ")); __consoleError(...args); };
</script>"""

# Per plot div: an svg was drawn, and for each trace the marks it drew (bars, line path, heatmap image).
REPORT_DRAWING = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const drawn = (group) => [...group.querySelectorAll("g.point path, path.js-line, image")]
    .filter((el) => (el.getAttribute("d") || el.getAttribute("href") || "").length > 2).length;
  const plots = [...document.querySelectorAll(".plotly-graph-div")].map((gd) => ({
    id: gd.id,
    svg: gd.querySelectorAll("svg.main-svg").length,
    traces: (gd.data || []).length,
    marks: [...gd.querySelectorAll(".barlayer .trace, .scatterlayer .trace, .heatmaplayer .hm")].map(drawn),
  }));
  const out = document.createElement("pre");
  out.id = "streamlens-check";
  out.textContent = JSON.stringify({errors: window.__errors, plots});
  document.body.appendChild(out);
}, 300));
</script>"""


def render(page: str, tmp_path) -> dict:
    """Open `page` in headless Chromium without network access; return what the check script saw."""
    instrumented = page.replace("<head>", "<head>" + RECORD_ERRORS, 1).replace("</body>", REPORT_DRAWING + "</body>", 1)
    path = tmp_path / "instrumented.html"
    path.write_text(instrumented, encoding="utf-8")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must need none
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=10000",
        "--dump-dom", path.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="streamlens-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script did not run; chromium said: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def empty_traces(plot: dict) -> int:
    """Traces that drew nothing (plotly gives an empty trace no layer at all, or one without marks)."""
    return plot["traces"] - sum(1 for marks in plot["marks"] if marks > 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_report_figure_renders(arch, tmp_path):
    model = load_model(str(tiny_model_folder(tmp_path / "model", arch=arch)), dtype="float64")
    text = " ".join(f"w{3 + (7 * i) % 61}" for i in range(70))  # ablations on two windows of 32 tokens
    report = standard_report(model, prompt="w5 w17 w33 w8", target="w9", data=text)
    page = report.to_html()
    assert not re.search(r"<script[^>]+src=", page), "the report must not load scripts from anywhere"

    seen = render(page, tmp_path)

    assert seen["errors"] == []
    assert len(seen["plots"]) == len(report.sections)
    for plot, section in zip(seen["plots"], report.sections):
        assert plot["svg"] > 0, f"{section.title}: nothing drawn"
        assert plot["traces"] == len(section.figure.data)
        assert empty_traces(plot) == 0, f"{section.title}: drawn marks per trace {plot['marks']}"


def test_the_check_catches_a_broken_figure(tmp_path):
    """The check is not vacuous: an empty trace and a JS error are both reported."""
    import plotly.graph_objects as go

    from streamlens.pages.html import Report, Section

    broken = go.Figure([go.Bar(x=[], y=[], name="empty"), go.Bar(x=["a"], y=[1.0], name="full")])
    page = Report("broken", (), (Section("broken", "", broken),)).to_html()
    page = page.replace("</body>", "<script>undefinedFunction()</script></body>")
    seen = render(page, tmp_path)
    assert any("undefinedFunction" in error for error in seen["errors"])
    assert empty_traces(seen["plots"][0]) == 1
