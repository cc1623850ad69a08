"""`streamlens report`: one self-contained HTML with every figure; bad input exits 2 and writes nothing."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.model import load_model
from streamlens.pages.report import standard_report
from streamlens.testing import tiny_model_folder

PROMPT = "w5 w17 w33 w8 w40"
# two windows of 32 tokens for the ablations (the tiny tokenizer's words are w3..w63)
TEXT = " ".join(f"w{3 + (7 * i) % 61}" for i in range(70))


@pytest.fixture(scope="module")
def prompt_set(tmp_path_factory):
    """A prompt set in the tiny vocabulary, like the built-in `data/prompts.jsonl`."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(f'{{"prompt": "w{i} w{i + 1} w{i + 2}", "target": " w{i + 3}"}}' for i in range(3, 15)))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("report-model"), arch="gpt2", n_layers=2, d_model=24, n_heads=3)


def run(*args):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def test_report_is_one_self_contained_page_with_every_figure(folder, prompt_set, tmp_path):
    out = tmp_path / "nested" / "report.html"
    result = run("--model", folder, "--prompt", PROMPT, "--target", "w9", "--data", prompt_set, "--dtype", "float64",
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it
    page = out.read_text(encoding="utf-8")

    sections = standard_report(load_model(str(folder), dtype="float64"), prompt=PROMPT, target="w9",
                               data=str(prompt_set)).sections
    assert len(sections) == 16  # 3 decomposition, 3 stream anatomy, 3 logit lens, 3 carry (issue 13), 3 ablation,
                                # 1 layer scores (issue 12)
    divs = re.findall(r'<div id="(plot-\d+)" class="plotly-graph-div"', page)
    assert divs == [f"plot-{i}" for i in range(len(sections))]
    for section in sections:
        assert section.title.replace("'", "&#x27;") in page
    # plotly.js is inside, once; nothing is fetched from anywhere
    assert page.count("plotly.js v") == 1 and len(page) > 3_000_000
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "Plotly.newPlot" in page and page.count("Plotly.newPlot") == len(sections)
    # the header says which model, prompt and target
    assert str(folder) in page and "w9" in page and "2 layers" in page and "12 prompts" in page


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp / "report.txt", "give a path ending in .html"),
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: tmp / "a-folder.html", "is a folder"),
    (lambda tmp: tmp / "a-file" / "report.html", "is a file, not a folder"),
])
def test_bad_out_exits_2_and_writes_nothing(folder, tmp_path, make_out, message):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder.html").mkdir()
    before = sorted(tmp_path.rglob("*"))
    result = run("--model", folder, "--prompt", PROMPT, "--data", TEXT, "--out", make_out(tmp_path))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--target", "w3 w4"], "is not a single token"),
    (["--prompt", "  "], "empty prompt"),
    (["--dtype", "float16"], "unknown dtype 'float16'"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--data", "missing.jsonl"], "does not exist"),
    (["--data", "w3 w4 w5"], "window 32 is longer than every text"),
])
def test_bad_input_exits_2_and_leaves_no_file(folder, tmp_path, args, message):
    out = tmp_path / "new" / "report.html"  # its folder must not be created either
    result = run("--model", folder, "--prompt", PROMPT, "--data", TEXT, *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
