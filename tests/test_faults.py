"""Careless and hostile input: each case of issue 11 ends in one `error:` line and exit 2 before any work
(or in the right answer), never a traceback, and never a file from two runs in one folder."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TEXT, one_error, run_cli
from streamlens.model import ModelLoadError, load_model

@pytest.fixture(scope="module")
def folder(llama_folder) -> Path:
    return llama_folder


# ----- model folders: no code, no pickles, and a broken folder is not an "unknown model" --------------
def _copy(folder: Path, into: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, into))


def test_a_folder_with_auto_map_is_refused_and_its_code_never_runs(folder, tmp_path):
    custom = _copy(folder, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError, match="auto_map.*never"):
        load_model(str(custom))
    one_error(run_cli("decompose", "--model", custom, "--prompt", "w5 w6"), "auto_map", "trust_remote_code=False")
    assert not marker.exists()


def test_a_pickle_only_folder_is_refused_with_one_line(folder, tmp_path):
    pickled = _copy(folder, tmp_path / "pickled")
    state = {"w": torch.zeros(2)}
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    one_error(run_cli("decompose", "--model", pickled, "--prompt", "w5 w6"), "only pickle checkpoints",
              "pytorch_model.bin", "safetensors or GGUF only")


@pytest.mark.parametrize("breakage, message", [
    ("not json", "is not readable JSON"),
    ('{"model_type": "no-such-architecture"}', "was found but could not be loaded"),
])
def test_a_broken_folder_is_not_called_an_unknown_model(folder, tmp_path, breakage, message):
    broken = _copy(folder, tmp_path / "broken")
    (broken / "config.json").write_text(breakage)
    result = run_cli("decompose", "--model", broken, "--prompt", "w5 w6")
    one_error(result, message)
    assert "unknown model" not in result.output


# ----- arguments: checked up front, with the value and the valid range ---------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--layers", "5-2"], ["5-2", "runs backwards"]),
    (["--layers", "0-99999999999"], ["99999999999", "too large", "0-65535"]),
    (["--layers", "x"], ["'x'", "not understood"]),
    (["--bootstrap", "1"], ["--bootstrap 1", "at least 40"]),
    (["--threads", "0"], ["--threads 0", "must be at least 1"]),
    (["--window", "1"], ["--window 1", "at least 2"]),
    (["--data", "/no/such/place/texts"], ["/no/such/place/texts", "does not exist"]),
    (["--data", "prompts", "--window", "8"], ["--window", "prompt set"]),
    (["--out", ""], ["--out ''", "empty"]),
])
def test_bad_ablate_arguments_exit_2_before_loading(tmp_path, args, fragments):
    # the model does not exist: an error about it would mean the argument was checked too late
    one_error(run_cli("ablate", "--model", tmp_path / "missing.gguf", "--out", tmp_path / "out", *args), *fragments)
    assert not (tmp_path / "out").exists()


def test_layers_given_twice_count_once():
    from streamlens.sites import parse_numbers

    assert parse_numbers("1,1,0-2", "--layers") == (1, 0, 2)


@pytest.mark.parametrize("command", [["decompose", "--prompt", "w5"], ["report"]])
def test_bfloat16_is_refused_before_loading(tmp_path, command):
    one_error(run_cli(*command, "--model", tmp_path / "missing", "--dtype", "bfloat16"), "bfloat16", "float32")


def test_highway_lr_out_of_range_and_divergence(tmp_path):
    one_error(run_cli("highway", "--skip-real", "--lr", "1e12", "--out", tmp_path / "h"), "1000000000000.0", "(0, 1]")
    one_error(run_cli("highway", "--skip-real", "--lr", "nan", "--out", tmp_path / "h"), "nan", "(0, 1]")
    assert not (tmp_path / "h").exists()


def test_highway_that_diverges_writes_nothing(tmp_path, monkeypatch):
    import streamlens.highway as hw

    real = hw.toy_highway

    def diverged(config, *args, **kwargs):
        result = real(config, *args, **kwargs)
        object.__setattr__(result, "final_loss", result.final_loss * float("nan"))
        return result

    monkeypatch.setattr(hw, "toy_highway", diverged)
    result = run_cli("highway", "--skip-real", "--depths", "2", "--steps", "2", "--width", "8", "--out", tmp_path / "h")
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    last = result.output.strip().splitlines()[-1]  # after the training's progress bar
    assert last.startswith("error: ") and "diverged" in last and "--lr" in last
    assert not (tmp_path / "h").exists()


def test_decompose_targets_and_tokens(folder):
    from streamlens.decomposition import decompose
    from streamlens.recording import record

    model = load_model(str(folder), dtype="float64")
    tokens = model.to_tokens("w5 w6 w7")
    with pytest.raises(ValueError, match="target True is a bool"):
        decompose(model, tokens, target=True)
    expected = decompose(model, tokens, target=9).target_ids
    for target in (np.int64(9), torch.tensor(9), np.int32(9)):
        assert torch.equal(decompose(model, tokens, target=target).target_ids, expected)
    with pytest.raises(ValueError, match="is a float"):
        decompose(model, tokens, target=9.0)
    for bad in (torch.zeros(0, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool),
                torch.ones(1, 5, dtype=torch.float32)):
        with pytest.raises(ValueError, match="non-empty \\[batch, pos\\] integer tensor"):
            record(model, bad)


def test_the_recorded_command_is_safe_to_paste(monkeypatch):
    from streamlens.results import command_line

    monkeypatch.setattr(sys, "argv", ["/usr/bin/streamlens", "ablate", "--data", "$(touch x)", "--out", "a b"])
    line = command_line()
    assert shlex.split(line) == ["streamlens", "ablate", "--data", "$(touch x)", "--out", "a b"]
    assert "'$(touch x)'" in line


# ----- outputs: checked first, written as one set -----------------------------------------------
def test_out_paths_are_checked_before_any_work(tmp_path):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    missing = tmp_path / "missing.gguf"  # would fail at loading: the --out error must come first
    one_error(run_cli("ablate", "--model", missing, "--out", dangling), "symlink", "does not exist")
    one_error(run_cli("highway", "--model", missing, "--out", dangling), "symlink")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_error(run_cli("decompose", "--model", missing, "--out", afile / "parts.csv"), "is a file, not a folder")
    one_error(run_cli("decompose", "--model", missing, "--out", tmp_path / "parts.txt"), "ending in .csv")
    one_error(run_cli("report", "--model", missing, "--out", dangling / "r.html"), "symlink")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link"]


def test_a_later_run_leaves_nothing_of_an_earlier_one(folder, tmp_path):
    out = tmp_path / "out"
    common = ("ablate", "--model", folder, "--data", TINY_TEXT, "--window", "8", "--max-windows", "4",
              "--bootstrap", "40", "--out", out)
    assert run_cli(*common, "--cumulative", "order").exit_code == 0
    assert (out / "ablation_cumulative.csv").exists()
    result = run_cli(*common)
    assert result.exit_code == 0, result.output
    assert not (out / "ablation_cumulative.csv").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".streamlens-staging")]


def test_a_disk_full_while_writing_keeps_the_earlier_set(folder, tmp_path, monkeypatch):
    import streamlens.files as files

    out = tmp_path / "out"
    common = ("ablate", "--model", folder, "--data", TINY_TEXT, "--window", "8", "--max-windows", "4",
              "--bootstrap", "40", "--out", out)
    assert run_cli(*common).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = files.write_atomic

    def full(path, content):
        if Path(path).name == "ablation.html":
            raise OSError(28, "No space left on device")
        return real(path, content)

    monkeypatch.setattr(files, "write_atomic", full)
    one_error(run_cli(*common, "--seed", "3"), "No space left on device")
    # the output set is untouched; the finished shards stay in the checkpoint folder, so the same
    # command resumes from them once the disk has room (streamlens.ablation.checkpoint)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / ".streamlens-checkpoint").is_dir()


def test_a_failed_move_rolls_the_whole_set_back(tmp_path, monkeypatch):
    import os

    import streamlens.files as files

    out = tmp_path / "out"
    files.write_outputs(out, {"a.csv": "1", "b.html": "1", "old.csv": "1"})
    real = os.replace
    calls = []

    def flaky(source, target):
        calls.append(target)
        if Path(target).name == "b.html" and Path(source).parent.name.startswith(".streamlens-staging"):
            raise OSError(5, "Input/output error")
        return real(source, target)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(OSError):
        files.write_outputs(out, {"a.csv": "2", "b.html": "2"})
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir() if not p.name.startswith(".")} == {
        "a.csv": "1", "b.html": "1", "old.csv": "1"}


def test_staging_folders_of_dead_processes_are_swept(tmp_path):
    import subprocess

    from streamlens.files import write_outputs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = tmp_path / "out"
    (out / f".streamlens-staging-{dead}-abc").mkdir(parents=True)
    write_outputs(out, {"a.csv": "1"})
    assert not [p for p in out.iterdir() if p.name.startswith(".streamlens-staging")]
