"""`streamlens prune`: the files and the proved export from a tiny model, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.testing import TINY_VOCAB, tiny_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    folder = tiny_model_folder(root / "model", arch="llama", n_layers=4)  # (qwen2's tiny tokenizer reloads broken)
    draw = random.Random(0)
    for name in ("choice.txt", "held_out.txt"):
        (root / name).write_text(" ".join(f"w{draw.randrange(3, TINY_VOCAB)}" for _ in range(200)))
    return root, folder


def _run(setup, *args):
    root, folder = setup
    return runner.invoke(app, ["prune", "--model", str(folder), "--data", str(root / "choice.txt"), "--eval-data",
                               str(root / "held_out.txt"), "--window", "12", "--choice-windows", "4",
                               "--eval-windows", "6", "--bootstrap", "50", *map(str, args)])


def test_prune_writes_the_table_the_page_and_a_proved_model(setup, tmp_path):
    out = tmp_path / "out"
    result = _run(setup, "-k", 2, "--compare-up-to", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert {"prune.csv", "prune.json", "prune.html", "model"} <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "prune.csv")
    assert set(table["strategy"]) == {"none", "greedy", "block_influence", "angular", "last", "attention", "mlp"}
    assert (table["ci_low"] <= table["loss"]).all() and (table["loss"] <= table["ci_high"]).all()
    meta = json.loads((out / "prune.json").read_text())
    assert meta["k"] == 2 and len(meta["removed_blocks"]) == 2 and meta["export"]["passed"]
    assert max(meta["export"]["max_relative_logit_difference"].values()) <= 1e-5
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    assert "The export, proved" in (out / "prune.html").read_text()
    again = _run(setup, "-k", 1, "--out", out)  # the export folder is used now
    assert again.exit_code == 2 and "exists and is not empty" in again.output


@pytest.mark.parametrize(("args", "message"), [
    (("-k", 4), "k 4 out of range: the model has 4 blocks, remove 1-3"),
    (("-k", 0), "--blocks 0 must be at least 1"),
    (("--budget", -0.5), "--budget -0.5 must be at least 0"),
    (("-k", 1, "--budget", 0.5), "not both"),
    (("--strategy", "attention"), "pass --no-export"),
    (("--strategy", "bogus"), "unknown --strategy 'bogus'"),
    (("--eval-data", "SAME"), "also occur in the choice data"),
    (("--data", "/no/such/file.txt"), "does not exist"),
    (("--gguf", "--no-export"), "drop --no-export"),
    (("--gguf",), "not a fast byte-level BPE tokenizer"),  # the tiny word-level tokenizer has no GGUF form
])
def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, args, message):
    root, _ = setup
    args = tuple(str(root / "choice.txt") if a == "SAME" else a for a in args)
    out = tmp_path / "out"
    result = _run(setup, *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") <= 2
    assert not out.exists()


def test_a_family_whose_config_cannot_lose_blocks_is_refused(tmp_path):
    folder = tiny_model_folder(tmp_path / "gpt2", arch="gpt2", n_layers=4, scale_attn_by_inverse_layer_idx=True)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 60 + 3}" for i in range(100)))
    result = runner.invoke(app, ["prune", "--model", str(folder), "--data", str(tmp_path / "t.txt"),
                                 "--eval-data", "stdlib", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "scale_attn_by_inverse_layer_idx" in result.output, result.output
    assert not (tmp_path / "out").exists()
