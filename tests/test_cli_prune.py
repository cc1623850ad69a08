"""`streamlens prune`: the files and the proved export from a tiny model, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.testing import TINY_VOCAB, tiny_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    folder = tiny_model_folder(root / "model", arch="llama", n_layers=4)  # (qwen2's tiny tokenizer reloads broken)
    draw = random.Random(0)
    for name in ("choice.txt", "held_out.txt", "train.txt"):
        (root / name).write_text(" ".join(f"w{draw.randrange(3, TINY_VOCAB)}" for _ in range(200)))
    return root, folder


def _run(setup, *args):
    root, folder = setup
    return runner.invoke(app, ["prune", "--model", str(folder), "--data", str(root / "choice.txt"), "--eval-data",
                               str(root / "held_out.txt"), "--window", "12", "--choice-windows", "4",
                               "--eval-windows", "6", "--bootstrap", "50", *map(str, args)])


def test_prune_writes_the_table_the_page_and_a_proved_model(setup, tmp_path):
    out = tmp_path / "out"
    root, _ = setup
    result = _run(setup, "-k", 2, "--compare-up-to", 2, "--out", out, "--heal-steps", 2, "--heal-loss", "lm",
                  "--heal-data", root / "train.txt", "--heal-windows", 6, "--generate-tokens", 3)
    assert result.exit_code == 0, result.output
    assert {"prune.csv", "prune.json", "prune.html", "model", "model-healed", "evaluation.csv", "generations.csv",
            "heal.csv"} <= {p.name for p in out.iterdir()}
    _check_evaluation_and_heal(setup, out)
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


def _check_evaluation_and_heal(setup, out):
    """The exported model's held-out loss (evaluation.csv: the folder loaded back) is the engine's simulated
    removal (prune.csv); the heal's "after" is the healed folder's own loss under plain transformers."""
    from transformers import AutoModelForCausalLM

    from streamlens import data as D
    from streamlens.model import load_model

    root, folder = setup
    strategies = pd.read_csv(out / "prune.csv").set_index(["strategy", "k"])
    judged = pd.read_csv(out / "evaluation.csv").set_index(["metric", "model"])
    assert judged.loc[("loss", "pruned"), "estimate"] == pytest.approx(strategies.loc[("greedy", 2), "loss"], rel=1e-5)
    assert judged.loc[("loss", "full"), "estimate"] == pytest.approx(strategies.loc[("none", 0), "loss"], rel=1e-5)
    assert 0 <= judged.loc[("kl_full_pruned", "pruned"), "estimate"] and len(pd.read_csv(out / "generations.csv")) == 3
    healed = pd.read_csv(out / "heal.csv").set_index(["metric", "stage"])
    assert healed.loc[("loss", "before"), "estimate"] == pytest.approx(judged.loc[("loss", "pruned"), "estimate"],
                                                                       rel=1e-6)
    tokens = D.corpus_batch(load_model(str(folder)), str(root / "held_out.txt"), 12, 6).tokens
    hf = AutoModelForCausalLM.from_pretrained(out / "model-healed").eval()
    with torch.no_grad():
        logits = hf(input_ids=tokens).logits[:, :-1].log_softmax(-1)
    loss = -logits.gather(-1, tokens[:, 1:, None])[..., 0].mean(-1).mean()
    assert healed.loc[("loss", "after"), "estimate"] == pytest.approx(float(loss), rel=1e-5)
    meta = json.loads((out / "prune.json").read_text())
    assert meta["heal"]["proved"] and max(meta["heal"]["proof"].values()) <= 1e-5 and len(meta["heal"]["train_loss"]) == 2
    assert json.loads((out / "model-healed" / "config.json").read_text())["num_hidden_layers"] == 2
    page = (out / "prune.html").read_text()
    assert "The pruned model against the full one" in page and "Healing" in page


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
    (("--heal-steps", -1), "--heal-steps -1 must be 0 (no healing) or more"),
    (("--heal-steps", 1, "--heal-data", "HELD_OUT"), "heal on texts disjoint from the evaluation set"),
    (("--heal-steps", 1, "--no-export"), "drop --no-export"),
    (("--heal-mode", "qlora"), "unknown --heal-mode 'qlora'"),
    (("--heal-lr", 0), "--heal-lr 0.0 must be positive"),
    (("--heal-steps", 1, "--heal-dir", "BUSY"), "exists and is not empty"),
])
def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, args, message):
    root, _ = setup
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    names = {"SAME": root / "choice.txt", "HELD_OUT": root / "held_out.txt", "BUSY": tmp_path / "busy"}
    args = tuple(str(names.get(a, a)) for a in args)
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


# ----- hostile: two runs into one --out at once, an interrupt mid-run (real processes) ------------------------
def _spawn(setup, out, *args):
    """`streamlens prune` on the tiny model as its own process (stdout and stderr together)."""
    root, folder = setup
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "streamlens", "prune", "--model", str(folder), "--data", str(root / "choice.txt"),
               "--eval-data", str(root / "held_out.txt"), "--window", "12", "--choice-windows", "4", "--eval-windows",
               "6", "--bootstrap", "40", "-k", "1", "--threads", "1", "--out", str(out), *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint():
    """Python turns SIGINT into KeyboardInterrupt only where it is not ignored (a background job's children
    inherit SIG_IGN): give the child the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _no_leftovers(out):
    """No temporary folder or file of a write or an export stays in `out`."""
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.startswith(".streamlens-staging")]


def test_two_runs_into_one_out_at_once_leave_one_whole_run(setup, tmp_path):
    out = tmp_path / "out"
    runs = [_spawn(setup, out, "--no-evaluate") for _ in range(2)]
    results = [(run.wait(timeout=600), run.stdout.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # both (one after the other), or the loser refused in one line
    for code, text in results:
        if code == 2:
            assert "exists and is not empty" in text and "Traceback" not in text, text
    meta = json.loads((out / "prune.json").read_text())  # the files of one whole run, and its proved export
    assert meta["export"]["passed"] and json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 3
    _no_leftovers(out)


def test_an_interrupt_mid_run_leaves_nothing_half_written_and_the_next_run_works(setup, tmp_path):
    out = tmp_path / "out"
    run = _spawn(setup, out)
    deadline = time.monotonic() + 600
    while not (out / "model").is_dir() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the export is in place: proving, judging or healing now
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) != 0, run.stdout.read()
    assert not (out / "model").exists() and not (out / "model-healed").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith("prune.")]
    _no_leftovers(out)
    again = _run(setup, "-k", 1, "--no-evaluate", "--out", out)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "prune.json").read_text())["export"]["passed"]
