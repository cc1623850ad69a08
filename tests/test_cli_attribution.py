"""`streamlens ablate --estimate`: the estimate is marked in every file, --verify-top writes the exact
numbers side by side, and bad combinations exit 2 before any work."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from streamlens import ablation as A
from streamlens.cli import app
from streamlens.plots import attribution as plots
from streamlens.plots.ablation import damage
from streamlens.testing import tiny_model_folder

runner = CliRunner()
TEXT = " ".join(f"w{3 + (7 * k) % 61}" for k in range(40))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_atp"), arch="llama")


def _run(*args):
    return runner.invoke(app, ["ablate", *map(str, args)])


def test_estimate_with_verification_writes_both_side_by_side(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = _run("--model", tiny_folder, "--dtype", "float64", "--unit", "head", "--method", "mean",
                  "--estimate", "atp", "--verify-top", "4", "--data", TEXT, "--window", "8", "--out", out)
    assert result.exit_code == 0, result.output
    assert {"ablation.csv", "ablation.json", "ablation.html", "ablation_verify.csv"} <= {p.name for p in out.iterdir()}
    estimate = pd.read_csv(out / "ablation.csv")
    assert set(estimate["estimate"]) == {"atp"} and set(estimate["metric"]) == {"loss_increase"}
    assert len(estimate) == 3 * 4  # every head of the tiny model
    verify = pd.read_csv(out / "ablation_verify.csv")
    assert len(verify) == 4 and {"estimate", "exact", "exact_ci_low", "error"} <= set(verify.columns)
    assert (verify["estimate"].abs().diff().dropna() <= 1e-12).all()  # largest estimate first
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["estimate"] == "atp" and len(meta["verified_units"]) == 4 and meta["agreement"]["units"] == 4
    html = (out / "ablation.html").read_text()
    assert "Estimated (atp)" in html and "estimate (atp) vs exact" in html


def test_exact_top_marks_rows_and_finds_the_sweeps_top(tiny_folder, tmp_path):
    """--estimate ig --exact-top 3: every row says exact or estimate, the measured rows hold the exact
    sweep's numbers, and the printed top 3 is the sweep's."""
    out, sweep_out = tmp_path / "out", tmp_path / "sweep"
    common = ("--model", tiny_folder, "--dtype", "float64", "--unit", "head", "--method", "mean", "--data", TEXT,
              "--window", "8", "--bootstrap", "100")
    result = _run(*common, "--estimate", "ig", "--ig-steps", "2", "--exact-top", "3", "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "ablation.csv")
    assert set(table["source"]) <= {"exact", "estimate"} and set(table["estimate"]) == {"ig-2"}
    assert "estimate_error" in table and (table.loc[table["source"] == "exact", "estimate_error"] == 0).all()
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["exact_top"]["evaluations"] == (table["source"] == "exact").sum() and meta["estimate"] == "ig-2"
    # 12 heads: 9 outside the top 3, fewer than the 19 a finite 95% conformal bound needs: all measured
    top = meta["exact_top"]
    assert (top["alpha"], len(top["calibration"]), top["evaluations"], top["settled"]) == (0.05, 9, 12, False)
    assert "never settled: every unit measured" in " ".join(result.output.split())
    assert "How far to trust each row" in (out / "ablation.html").read_text()
    assert _run(*common, "--out", sweep_out).exit_code == 0
    sweep = pd.read_csv(sweep_out / "ablation.csv")
    sweep = sweep[sweep["metric"] == "loss_increase"].set_index("unit")["value"]
    for unit, value in table[table["source"] == "exact"].set_index("unit")["value"].items():
        assert value == pytest.approx(sweep[unit], abs=1e-9)
    top = sweep.sort_values(ascending=False).index[:3].tolist()
    assert f"exact top 3: {', '.join(top)}" in " ".join(result.output.split())


def test_local_estimate_is_marked_and_verified(tiny_folder, tmp_path):
    """--estimate local: rows say local-0, and the verified rows sit next to the exact numbers."""
    out = tmp_path / "out"
    result = _run("--model", tiny_folder, "--dtype", "float64", "--unit", "attn", "--method", "resample",
                  "--estimate", "local", "--verify-top", "3", "--data", TEXT, "--window", "8", "--out", out)
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(out / "ablation.csv")["estimate"]) == {"local-0"}
    verify = pd.read_csv(out / "ablation_verify.csv")
    assert len(verify) == 3 and (verify["error"] - (verify["estimate"] - verify["exact"])).abs().max() < 1e-12


@pytest.mark.parametrize("args, message", [
    (("--estimate", "atq"), "unknown --estimate 'atq'"),
    (("--verify-top", "3"), "--verify-top / --verify-all / --exact-top check an estimate"),
    (("--estimate", "atp", "--effect", "direct"), "the estimate is of the total effect"),
    (("--estimate", "atp", "--cumulative", "order"), "cumulative removal is measured"),
    (("--estimate", "atp", "--metrics", "kl"), "metric 'kl' has no useful gradient"),
    (("--estimate", "atp", "--ig-steps", "4"), "--ig-steps 4 applies to --estimate ig only"),
    (("--estimate", "ig", "--ig-steps", "0"), "ig steps 0 must be an integer from 1 to 256"),
    (("--exact-top", "3"), "--exact-top check an estimate"),
    (("--estimate", "ig", "--exact-top", "-1"), "--exact-top -1 must be at least 1"),
    (("--estimate", "ig", "--exact-top", "2", "--verify-top", "2"), "drop --verify-top"),
])
def test_bad_combinations_exit_2_before_any_work(tiny_folder, tmp_path, args, message):
    out = tmp_path / "never"
    result = _run("--model", tiny_folder, *args, "--out", out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_figures_say_estimate(tiny):
    from streamlens.data import window_batch
    import torch

    batch = window_batch(torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(2)))
    estimate = A.attribute(tiny, batch, "mlp", "zero", n_boot=40)
    exact = A.verify(tiny, batch, estimate, n_boot=40)
    scatter = plots.estimate_vs_exact(estimate, exact)
    assert "estimate (atp) vs exact" in scatter.layout.title.text and len(scatter.data[1].x) == tiny.n_layers
    assert "estimate" in scatter.layout.yaxis.title.text and "exact" in scatter.layout.xaxis.title.text
    bars = plots.side_by_side(estimate, exact)
    assert [trace.name for trace in bars.data] == ["estimate (atp)", "exact"]
    assert damage(estimate).layout.title.text.startswith("Estimated (atp)")
    assert "estimate" in damage(estimate).data[0].name and "Estimated" not in damage(exact).layout.title.text
    with pytest.raises(ValueError, match="not an estimate"):
        plots.estimate_vs_exact(exact, estimate)


@pytest.mark.real
def test_real_model_estimate_with_verification(tmp_path):
    out = tmp_path / "out"
    result = _run("--unit", "block", "--method", "mean", "--estimate", "atp", "--verify-top", "3", "--window", "16",
                  "--max-windows", "4", "--bootstrap", "200", "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    estimate = pd.read_csv(out / "ablation.csv")
    assert len(estimate) == 30 and set(estimate["estimate"]) == {"atp"}
    verify = pd.read_csv(out / "ablation_verify.csv")
    top = estimate.reindex(estimate["value"].abs().sort_values(ascending=False).index)["unit"].head(3).tolist()
    assert verify["unit"].tolist() == top
    assert (verify["exact_ci_low"] <= verify["exact"] + 1e-9).all()
