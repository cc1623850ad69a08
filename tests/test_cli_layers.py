"""`streamlens layers`: the three files from two tiny models overlaid, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.testing import tiny_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return [tiny_model_folder(tmp_path_factory.mktemp(arch), arch=arch, n_layers=4) for arch in ("llama", "gpt2")]


def _run(*args):
    return runner.invoke(app, ["layers", *map(str, args)])


def test_two_models_overlay_in_one_page(folders, tmp_path):
    out = tmp_path / "out"
    result = _run("--model", folders[0], "--model", folders[1], "--max-windows", 4, "--window", 12,
                  "--greedy-pool", 3, "--bootstrap", 50, "--out", out)
    assert result.exit_code == 0, result.output
    assert {"layers.csv", "layers.json", "layers.html"} <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "layers.csv")
    assert table["model"].nunique() == 2
    assert {"block", "attn", "mlp", "swap", "span", "greedy attn", "greedy mlp", "score", "repair"} <= set(table["part"])
    assert table.loc[table["part"] != "score", "depth"].dropna().between(0, 1).all()
    meta = json.loads((out / "layers.json").read_text())
    assert len(meta["models"]) == 2
    claims = [v["claim"] for v in meta["models"][0]["verdicts"]]
    assert len(claims) == 7 and all(v["verdict"] in ("holds", "differs", "unclear") for v in meta["models"][0]["verdicts"])
    page = (out / "layers.html").read_text()
    assert "depth l / (L - 1)" in page and "Gromov" in page


@pytest.mark.parametrize("args, message", [
    (["--span-sizes", "9"], "span size 9 out of range"),
    (["--repair-layers", "7"], "out of range"),
    (["--greedy-pool", "0"], "--greedy-pool 0"),
    (["--data", "prompts"], "prompt set"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--max-windows", "1"], "--max-windows 1"),
    (["--workers", "0"], "--workers 0 must be at least 1"),
    (["--workers", "2", "--device", "mps"], "--device 'mps' with Ray workers"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(folders, tmp_path, args, message):
    out = tmp_path / "never"
    result = _run("--model", folders[0], *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()
