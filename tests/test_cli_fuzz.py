"""CLI fuzz: random combinations of good and bad arguments end in exit 0, or exit 2 with one `error:`
line; never a traceback (hypothesis, few derandomised examples; STREAMLENS_HYPOTHESIS_EXAMPLES for more)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from streamlens.cli import app  # noqa: E402
from streamlens.testing import tiny_model_folder  # noqa: E402

EXAMPLES = int(os.environ.get("STREAMLENS_HYPOTHESIS_EXAMPLES", "5")) * 3
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(hypothesis.HealthCheck))
TEXT = " ".join(f"w{3 + (7 * k) % 61}" for k in range(30))
runner = CliRunner()

numbers = st.sampled_from(["0", "1", "0-1", "1,1", "2-0", "0-99999999999", "-1", "x", "", "0,2", " 1 "])
small_ints = st.sampled_from(["-1", "0", "1", "2", "3", "40", "1e3", "abc"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("fuzz"), arch="gpt2", n_layers=2)


def _options(draw_pairs) -> st.SearchStrategy[list[str]]:
    """A random subset of (option, value strategy) pairs, flattened into argv."""
    return st.lists(st.sampled_from(draw_pairs), unique_by=lambda pair: pair[0], max_size=5).flatmap(
        lambda chosen: st.tuples(*[st.tuples(st.just(name), values) for name, values in chosen]) if chosen
        else st.just(())).map(lambda pairs: [part for pair in pairs for part in pair])


ABLATE = [
    ("--unit", st.sampled_from(["block", "attn", "mlp", "head", "neuron"])),
    ("--method", st.sampled_from(["zero", "mean", "resample", "random"])),
    ("--effect", st.sampled_from(["total", "direct", "both", "none"])),
    ("--layers", numbers), ("--heads", numbers),
    ("--bootstrap", st.sampled_from(["1", "39", "40", "-5"])),
    ("--window", st.sampled_from(["1", "2", "4", "500", "0"])),
    ("--max-windows", st.sampled_from(["0", "1", "3"])),
    ("--positions", st.sampled_from(["all", "last", "2:", "9:", "x", ":-1"])),
    ("--threads", small_ints), ("--batch-size", small_ints),
    ("--metrics", st.sampled_from(["kl", "kl,loss_increase", "nope", ",", "target_logit_change"])),
    ("--data", st.sampled_from([TEXT, "prompts", "/no/such/file", "missing.jsonl", " ", "w3"])),
    ("--dtype", st.sampled_from(["float32", "float64", "bfloat16", "float16"])),
    ("--cumulative", st.sampled_from(["none", "order", "sideways"])),
    ("--seed", st.sampled_from(["0", "-1", "7"])),
]
DECOMPOSE = [
    ("--prompt", st.sampled_from(["w5 w6 w7", "", "   ", "w5"])),
    ("--target", st.sampled_from(["w5", "w5 w6", "nope-not-a-token", "7"])),
    ("--contrast", st.sampled_from(["w6", "w7 w8"])),
    ("--position", st.sampled_from(["-1", "0", "2", "9", "-10"])),
    ("--dtype", st.sampled_from(["float32", "float64", "bfloat16", "int8"])),
    ("--threads", small_ints),
]
HIGHWAY = [
    ("--depths", st.sampled_from(["2", "2,3", "0", "2,2", "5-2", "2000", "x"])),
    ("--steps", st.sampled_from(["0", "1", "-1"])),
    ("--width", st.sampled_from(["0", "4", "8"])),
    ("--lr", st.sampled_from(["1e-3", "0", "-1", "1e12", "nan", "inf"])),
    ("--norm", st.sampled_from(["none", "layer", "batch"])),
    ("--init", st.sampled_from(["torch", "he", "xavier"])),
    ("--threads", small_ints),
]


def _check(result, argv) -> None:
    assert result.exit_code in (0, 2), (argv, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (argv, repr(result.exception))
    assert "Traceback" not in result.output, (argv, result.output)
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 or "Usage:" in result.output, (argv, result.output)  # ours, or click's own usage error


@FUZZ
@given(options=_options(ABLATE))
def test_ablate_fuzz(folder, tmp_path_factory, options):
    if "--data" not in options:
        options = [*options, "--data", TEXT]
    if "--window" not in options and "prompts" not in options:
        options = [*options, "--window", "4"]
    if "--max-windows" not in options and "prompts" not in options:
        options = [*options, "--max-windows", "3"]
    if "--bootstrap" not in options:
        options = [*options, "--bootstrap", "40"]
    argv = ["ablate", "--model", str(folder), "--out", str(tmp_path_factory.mktemp("o")), *options]
    _check(runner.invoke(app, argv), argv)


@FUZZ
@given(options=_options(DECOMPOSE))
def test_decompose_fuzz(folder, options):
    argv = ["decompose", "--model", str(folder), *(options if "--prompt" in options else [*options, "--prompt", "w5 w6"])]
    _check(runner.invoke(app, argv), argv)


@FUZZ
@given(options=_options(HIGHWAY))
def test_highway_fuzz(tmp_path_factory, options):
    argv = ["highway", "--skip-real", "--out", str(tmp_path_factory.mktemp("h")), *options]
    if "--depths" not in options:
        argv += ["--depths", "2"]
    if "--steps" not in options:
        argv += ["--steps", "1"]
    if "--width" not in options:
        argv += ["--width", "4"]
    _check(runner.invoke(app, argv), argv)
