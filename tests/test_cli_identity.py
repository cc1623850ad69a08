"""`streamlens identity` and `streamlens lens train|eval` on a tiny model: files written; bad input exits 2,
one line, nothing written."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import one_error, run_cli


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    lines = [" ".join(f"w{3 + (7 * i + k) % 12}" for k in range(16)) for i in range(3)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def test_identity_writes_its_files(gpt2_folder, texts, tmp_path):
    out = tmp_path / "identity"
    result = run_cli("identity", "--model", str(gpt2_folder), "--data", str(texts), "--window", "8",
                     "--remove-skips", "1", "--prompt", "w3 w4 w5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "identity.csv", "identity_sources.csv", "identity.json", "identity.html"}
    summary = json.loads((out / "identity.json").read_text())
    assert summary["sources"]["split_error"] < 1e-4
    table = pd.read_csv(out / "identity.csv")
    assert set(table.condition) == {"clean", "no skip 1"}


@pytest.mark.parametrize("args, message", [
    (["--remove-skips", "7"], "layer 7 out of range"),
    (["--remove-skips", "1", "--target", "w3 w4"], "not a single token"),
    (["--remove-skips", "1", "--window", "1"], "--window 1"),
])
def test_identity_bad_input(gpt2_folder, texts, tmp_path, args, message):
    out = tmp_path / "never"
    result = run_cli("identity", "--model", str(gpt2_folder), "--data", str(texts), "--out", str(out), *args)
    one_error(result, message)
    assert not out.exists()


def test_lens_train_then_eval(gpt2_folder, texts, tmp_path):
    out = tmp_path / "lens"
    result = run_cli("lens", "train", "--model", str(gpt2_folder), "--data", str(texts), "--window", "8",
                     "--steps", "3", "--batch-tokens", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "lens.safetensors").stat().st_size > 0 and (out / "lens_train.html").exists()
    evaluated = tmp_path / "eval"
    other = " ".join(f"w{3 + (5 * k) % 12}" for k in range(16))  # not a training text: those are refused
    result = run_cli("lens", "eval", "--lens", str(out / "lens.safetensors"), "--model", str(gpt2_folder),
                     "--data", other, "--window", "8", "--out", str(evaluated))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(evaluated / "lens_eval.csv")
    assert set(table.lens) == {"logit lens", "tuned lens"}


def test_lens_bad_input(gpt2_folder, texts, tmp_path):
    out = tmp_path / "never"
    result = run_cli("lens", "eval", "--lens", str(tmp_path / "missing.safetensors"), "--model",
                     str(gpt2_folder), "--out", str(out))
    one_error(result, "is not a file")
    result = run_cli("lens", "train", "--model", str(gpt2_folder), "--steps", "0", "--out", str(out))
    one_error(result, "--steps 0 out of range")
    assert not out.exists()
