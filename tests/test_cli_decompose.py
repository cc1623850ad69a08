"""`streamlens decompose`: prints the exact split; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.testing import tiny_model_folder

runner = CliRunner()


def test_decompose_prints_and_writes_a_table_that_sums(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", arch="gpt2")
    out = tmp_path / "parts.csv"
    result = runner.invoke(app, ["decompose", "--model", str(folder), "--prompt", "w5 w6 w7", "--dtype", "float64",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sum of contributions" in result.output
    table = pd.read_csv(out)
    assert abs(table["contribution"].sum() - table["logit"].iloc[0]) <= 1e-8
    assert {"embed", "pos_embed", "attn 2", "mlp 2", "norm bias", "unembed bias"} <= set(table["component"])


def test_decompose_bad_target_exits_2_without_files(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", arch="llama")
    out = tmp_path / "parts.csv"
    result = runner.invoke(app, ["decompose", "--model", str(folder), "--prompt", "w5 w6", "--target", "w5 w6",
                                 "--out", str(out)])
    assert result.exit_code == 2
    assert "is not a single token" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["decompose", "--model", str(folder), "--prompt", "w5", "--position", "3"])
    assert result.exit_code == 2 and "position 3 out of range" in result.output
