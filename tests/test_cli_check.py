"""`streamlens check`: one table; exit 0 when exact, 1 when a check fails, 2 when the model is refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.testing import tiny_model_folder

runner = CliRunner()


@pytest.mark.parametrize("arch", ["gemma3_text", "phi"])
def test_check_passes_on_exact_families_and_writes_its_table(tmp_path, arch):
    folder = tiny_model_folder(tmp_path / "model", arch=arch)
    result = runner.invoke(app, ["check", str(folder), "--dtype", "float64", "--out", str(tmp_path / "out")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and arch in result.output
    table = pd.read_csv(tmp_path / "out" / "check.csv")
    assert set(table["check"]) == {"bridge vs HF", "read-out", "identity", "decomposition", "head sum", "ablation"}
    assert table["ok"].all() and (table["error"] <= table["tolerance"]).all()
    assert json.loads((tmp_path / "out" / "check.json").read_text())["passed"] is True


def test_check_fails_with_exit_1_on_soft_capped_logits(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", arch="gemma2", final_logit_softcapping=3.0)
    result = runner.invoke(app, ["check", "--model", str(folder), "--dtype", "float64"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "NOT exact" in result.output and "soft-capping" in result.output


def test_check_refuses_a_missing_model_with_exit_2(tmp_path):
    result = runner.invoke(app, ["check", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "does not exist" in result.output
