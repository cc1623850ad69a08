"""The shared option groups (cli/options.py): every command takes the groups it should, and refuses a bad
value of a group the same way; plus issue 19's option and message cases, each a one-line exit-2 error."""

from __future__ import annotations

import errno
import json
import os

import pytest
import typer.main

from conftest import one_error, run_cli
from streamlens.cli import app
from streamlens.cli.options import DTYPES, max_threads

MODEL = ("--model", "--dtype", "--device", "--threads", "--verify")
DATA = ("--data",)
WINDOW = ("--window",)
PROMPT = ("--prompt", "--target")
OUTPUT = ("--out",)
COMMANDS = {  # command -> the options it must take (by group)
    "ablate": MODEL + DATA + WINDOW + ("--max-windows",) + OUTPUT,
    "decompose": MODEL + PROMPT + OUTPUT,
    "report": MODEL + DATA + PROMPT + OUTPUT,
    "highway": MODEL + OUTPUT,
    "check": MODEL + OUTPUT,
    "layers": MODEL + DATA + WINDOW + ("--max-windows",) + OUTPUT,
    "identity": MODEL + DATA + WINDOW + PROMPT + OUTPUT,
    "lens train": MODEL + DATA + WINDOW + OUTPUT,
    "lens eval": MODEL + DATA + WINDOW + OUTPUT,
    "prune": MODEL + DATA + WINDOW + OUTPUT,
    "residuals": OUTPUT,
}
REQUIRED = {"lens eval": ["--lens", "missing.safetensors"]}
WITH_MODEL = sorted(name for name, options in COMMANDS.items() if "--model" in options)  # residuals trains its own


def _command(name: str):
    command = typer.main.get_command(app)
    for part in name.split():
        command = command.commands[part]
    return command


def _options(name: str) -> dict[str, object]:
    return {option: param for param in _command(name).params for option in param.opts}


def _run(args, tmp_path, monkeypatch, **kwargs):
    monkeypatch.chdir(tmp_path)  # default --out folders land here (and nothing may be written)
    return run_cli(*args, **kwargs)


def test_every_command_is_listed():
    top = typer.main.get_command(app).commands
    names = {name for name, command in top.items() if not hasattr(command, "commands")}
    names |= {f"{name} {sub}" for name, command in top.items() for sub in getattr(command, "commands", {})}
    assert names == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_its_groups_with_one_help_text(name):
    options = _options(name)
    missing = [option for option in COMMANDS[name] if option not in options]
    assert not missing, f"{name} lacks {missing}"
    reference = _options("ablate")
    for option in [option for option in ("--device", "--threads", "--verify", "--model") if option in COMMANDS[name]]:
        assert options[option].help.startswith(reference[option].help), (name, option)  # declared once


@pytest.mark.parametrize("name", WITH_MODEL)
@pytest.mark.parametrize("threads", [0, 100000])
def test_absurd_threads_are_refused_the_same_way_everywhere(name, threads, tmp_path, monkeypatch):
    result = _run([*name.split(), *REQUIRED.get(name, []), "--threads", threads], tmp_path, monkeypatch)
    line = one_error(result)
    assert line == f"error: --threads {threads} must be at least 1 and at most {max_threads()} (4 per CPU of " \
                   f"this machine's {os.cpu_count()}); leave it out for the idle cores"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", WITH_MODEL)
def test_help_and_validation_agree_on_dtypes(name, tmp_path, monkeypatch):
    """A dtype the help offers passes the group (the next bad value, --threads 0, is what fails); one it
    does not offer is refused naming --dtype (issue 19: check offered bfloat16, then refused it)."""
    help_text = _options(name)["--dtype"].help
    offered = [dtype for dtype in DTYPES if dtype in help_text.split("(")[0]]
    assert "float32" in offered
    for dtype in (*DTYPES, "float16"):
        result = _run([*name.split(), *REQUIRED.get(name, []), "--dtype", dtype, "--threads", 0], tmp_path,
                      monkeypatch)
        one_error(result, *(("--threads 0",) if dtype in offered else ("--dtype", dtype)))


WITH_BOOTSTRAP = sorted(name for name in COMMANDS if "--bootstrap" in _options(name))


def test_the_bootstrap_option_is_declared_once():
    assert WITH_BOOTSTRAP == ["ablate", "layers", "prune"]
    assert len({id(_options(name)["--bootstrap"].help) for name in WITH_BOOTSTRAP}) == 1


@pytest.mark.parametrize("name", WITH_BOOTSTRAP)
@pytest.mark.parametrize("n_boot", [39, 10**15])
def test_every_bootstrap_is_checked_by_the_one_rule_before_any_load(name, n_boot, tmp_path, monkeypatch):
    """Too few replicates, or more than memory holds: the same streamlens.limits message everywhere, exit 2."""
    result = _run([name, "--bootstrap", n_boot], tmp_path, monkeypatch)
    expected = ("--bootstrap 39 must be a whole number of at least 40",) if n_boot == 39 else \
        (f"--bootstrap {n_boot} needs", "GB", "use at most")
    one_error(result, *expected)
    assert os.listdir(tmp_path) == []


def test_click_errors_and_ours_share_one_form(tmp_path, monkeypatch):
    for args in (["ablate", "--bogus"], ["ablat"], ["lens", "train", "--steps", "x"]):
        result = _run(args, tmp_path, monkeypatch)
        assert result.exit_code == 2
        assert any(line.startswith("error: ") for line in result.output.splitlines()), result.output
        assert "Error" not in result.output, result.output


def test_help_keeps_square_brackets():
    result = run_cli("ablate", "--help", env={"COLUMNS": "300"})
    assert "pip install 'streamlens[ray]'" in result.output


def test_identity_names_a_prompt_set_as_such(tmp_path, monkeypatch):
    one_error(_run(["identity", "--data", "prompts"], tmp_path, monkeypatch), "'prompts' is a prompt set",
               "identity runs on texts")


def test_data_and_every_model_are_checked_before_any_load(gpt2_folder, tmp_path, monkeypatch):
    """issue 19: `lens train` and `layers` loaded the model before refusing bad data or a second bad --model."""
    import streamlens.model

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(streamlens.model, "load_model", no_load)
    one_error(_run(["lens", "train", "--data", tmp_path / "missing.txt"], tmp_path, monkeypatch), "missing.txt")
    one_error(_run(["layers", "--model", gpt2_folder, "--model", tmp_path / "gone"], tmp_path, monkeypatch),
               f"--model {tmp_path / 'gone'} does not exist")
    one_error(_run(["layers", "--data", "prompts"], tmp_path, monkeypatch), "is a prompt set")
    one_error(_run(["identity", "--window", 1], tmp_path, monkeypatch), "--window 1 must be at least 2")


def test_check_prints_whole_values_when_stdout_is_not_a_terminal(gpt2_folder, tmp_path, monkeypatch):
    """issue 19: piped, rich cut every value to 80 columns ('7.5e-…')."""
    result = _run(["check", gpt2_folder, "--dtype", "float64"], tmp_path, monkeypatch, env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "ablation" in result.output and "load s" in result.output


def test_a_write_error_names_the_file(gpt2_folder, tmp_path, monkeypatch):
    """issue 19: "[Errno 27] File too large" named no file."""
    import streamlens.files

    def too_large(path, content):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(streamlens.files, "write_atomic", too_large)
    out = tmp_path / "parts.csv"
    result = _run(["decompose", "--model", gpt2_folder, "--target", "w3", "--out", out], tmp_path, monkeypatch)
    one_error(result, str(out), "File too large")
    assert not out.exists()


def test_contrast_equal_to_target_is_refused(gpt2_folder, tmp_path, monkeypatch):
    result = _run(["decompose", "--model", gpt2_folder, "--target", "w3", "--contrast", "w3"], tmp_path, monkeypatch)
    one_error(result, "contrast 'w3' is the target itself", "0 by definition")


def test_a_resume_with_other_positions_names_positions(gpt2_folder, tmp_path, monkeypatch):
    """issue 19: the unfinished run's other --positions was blamed on data_sha256."""
    from streamlens.ablation.backends import CHECKPOINT_FOLDER

    out = tmp_path / "out"
    (out / CHECKPOINT_FOLDER).mkdir(parents=True)
    stored = {"unit": "block", "method": "zero", "positions": "all", "window": 8, "max_windows": 4}
    (out / CHECKPOINT_FOLDER / "identity.json").write_text(json.dumps(stored))
    args = ["ablate", "--model", gpt2_folder, "--data", "w3 w4 w5 w6 w7 w8 w9 w10 " * 8, "--window", 8,
            "--max-windows", 4, "--positions", "last", "--bootstrap", 40, "--out", out]
    one_error(_run(args, tmp_path, monkeypatch), "made by another run: --positions all there, last now")
