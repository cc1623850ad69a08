"""`streamlens ablate`: the three files with their columns, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import one_error, run_cli
from streamlens.files import OUTPUTS_MANIFEST as MANIFEST

COLUMNS = {"unit", "kind", "layer", "head", "method", "effect", "metric", "value", "ci_low", "ci_high"}


@pytest.fixture(scope="module")
def words_file(tmp_path_factory):
    """Texts in the tiny model's vocabulary (its tokenizer knows only w3..w63)."""
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    lines = [json.dumps({"text": " ".join(f"w{3 + (7 * i + 5 * k) % 61}" for k in range(20))}) for i in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_default_run_on_tiny_model_writes_three_files(llama_folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli("ablate", "--model", llama_folder, "--out", out)  # built-in texts, every other option default
    assert result.exit_code == 0, result.output
    # the three files, and the manifest that lets the next run replace exactly this set
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "ablation.csv", "ablation.html", "ablation.json"]
    assert json.loads((out / MANIFEST).read_text()) == ["ablation.csv", "ablation.html", "ablation.json"]
    frame = pd.read_csv(out / "ablation.csv")
    assert COLUMNS <= set(frame.columns)
    assert list(frame["unit"].unique()) == ["block 0", "block 1", "block 2"]
    assert set(frame["metric"]) == {"loss_increase", "kl", "top1_agreement"}
    assert (frame["ci_low"] <= frame["value"] + 1e-12).all() and (frame["value"] <= frame["ci_high"] + 1e-12).all()
    meta = json.loads((out / "ablation.json").read_text())
    for key in ("model", "weights_hash", "dtype", "data", "n_tokens", "seed", "versions", "seconds", "command"):
        assert key in meta, key
    assert meta["n_tokens"] == 16 * 64 and meta["data"].startswith("builtin")
    html = (out / "ablation.html").read_text()
    assert len(html) > 1_000_000 and "src=\"https://cdn.plot.ly" not in html  # plotly.js embedded: offline
    assert "most damaging" in result.output and "least damaging" in result.output


def test_heads_resample_both_effects_cumulative(llama_folder, words_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("ablate", "--model", llama_folder, "--data", words_file, "--unit", "head", "--heads", "0,3",
                     "--layers", "1-2", "--method", "resample", "--effect", "both", "--cumulative", "greedy",
                     "--window", "8", "--max-windows", "6", "--metrics", "kl,loss_increase", "--bootstrap", "200",
                     "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "ablation.csv")
    assert set(frame["effect"]) == {"direct", "total"} and set(frame["metric"]) == {"kl", "loss_increase"}
    assert sorted(frame["unit"].unique()) == ["L1H0", "L1H3", "L2H0", "L2H3"]
    assert set(frame["head"]) == {0, 3} and set(frame["layer"]) == {1, 2}
    curve = pd.read_csv(out / "ablation_cumulative.csv")
    assert sorted(curve["n_removed"].unique()) == [1, 2, 3, 4]
    assert json.loads((out / "ablation.json").read_text())["cumulative_order"] is not None


def test_prompt_set_with_targets(llama_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7", "target": "w8"}\n{"prompt": "w10 w11", "target": "w12"}\n'
                       '{"prompt": "w20", "target": "w21"}\n')
    result = run_cli("ablate", "--model", llama_folder, "--data", prompts, "--unit", "mlp", "--out",
                     tmp_path / "out")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "out" / "ablation.csv")
    assert {"target_logit_change", "target_prob_change"} <= set(frame["metric"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--unit", "neuron"], "unknown --unit 'neuron': choose from block, attn, mlp, head"),
        (["--method", "shuffle"], "unknown --method 'shuffle': choose from zero, mean, resample"),
        (["--effect", "indirect"], "unknown --effect 'indirect': choose from total, direct, both"),
        (["--cumulative", "random"], "unknown --cumulative 'random'"),
        (["--layers", "7"], "layer 7 out of range: model has 3 layers (0-2)"),
        (["--layers", "one"], "--layers 'one' not understood"),
        (["--unit", "head", "--heads", "4"], "head 4 out of range: model has 4 heads per layer (0-3)"),
        (["--metrics", "accuracy"], "unknown metric 'accuracy'"),
        (["--positions", "middle"], "positions 'middle' not understood"),
        (["--data", "{missing}"], "missing.txt does not exist"),
        (["--data", "{empty}"], "empty.txt is empty"),
        (["--data", "{bad}"], "bad.jsonl line 2: not valid JSON"),
        (["--data", "prompts", "--metrics", "kl", "--positions", "last"], "apply to text windows"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    ],
)
def test_bad_input_exits_2_naming_the_value(llama_folder, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "w5 w6"}\n{"text": w7}\n')
    paths = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "bad": tmp_path / "bad.jsonl"}
    out = tmp_path / "out"
    result = run_cli("ablate", "--model", llama_folder, "--out", out, *[a.format(**paths) for a in args])
    one_error(result, message)
    assert not out.exists()


def test_unwritable_out_fails_before_any_work(llama_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        result = run_cli("ablate", "--model", llama_folder, "--out", out)
        one_error(result, str(blocker))
    assert blocker.read_text() == "x"


def test_error_is_one_line_on_stderr_from_a_real_process(tmp_path):
    script = Path(sys.executable).parent / "streamlens"  # the installed console script
    done = subprocess.run([str(script), "ablate", "--unit", "neuron", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: unknown --unit 'neuron': choose from block, attn, mlp, head"]
    assert not (tmp_path / "o").exists()


@pytest.mark.real
def test_real_model_small_run(tmp_path):
    out = tmp_path / "out"
    result = run_cli("ablate", "--layers", "0,29", "--window", "16", "--max-windows", "4", "--bootstrap", "200",
                     "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "ablation.csv")
    loss = frame[frame["metric"] == "loss_increase"].set_index("unit")["value"]
    assert list(loss.index) == ["block 0", "block 29"] and (loss > 0).all()
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["model"] == "smollm2" and meta["n_tokens"] == 64
