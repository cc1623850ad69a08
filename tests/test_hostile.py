"""Trust II (issue 19): what a hostile or careless user broke, one test per case of the fault matrix in
docs/trust.md. Each ends in the right numbers, or in one `error:` line and exit 2 before any work; never a
traceback, a hang, or a file written from damaged input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, one_error, run_cli
from streamlens.model import ModelLoadError, cache, load_model
from streamlens.testing import tiny_gguf_file, tiny_tokenizer

@pytest.fixture(scope="module")
def folder(llama_folder) -> Path:
    return llama_folder


def _flip(path: Path, at: int, keep_mtime: bool = True) -> None:
    """Flip the low bit of one byte, keeping the size (and the mtime)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# ----- 1. damage that keeps size and mtime in the cached conversion --------------------------------
@pytest.fixture()
def gguf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STREAMLENS_CACHE", str(tmp_path / "cache"))
    return tiny_gguf_file(tmp_path / "tiny.gguf", "qwen2")


def _edit_eps(config: Path) -> None:
    """rms_norm_eps with another first digit (same length), mtime kept: the issue's hand edit."""
    import re

    before = config.stat()
    text = config.read_text()
    edited = re.sub(r'("rms_norm_eps": )(\d)', lambda m: m.group(1) + str(int(m.group(2)) % 9 + 1), text)
    assert edited != text and len(edited) == len(text)
    config.write_text(edited)
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flipped weight byte", "edited rms_norm_eps"])
def test_cache_damage_that_keeps_size_and_mtime_is_caught_by_default(gguf, capfd, damage):
    tokens = torch.tensor([[3, 9, 17, 30, 41]])
    first = load_model(str(gguf), dtype="float64")
    clean = first.run(tokens)
    entry = Path(first.info.source)
    if damage == "flipped weight byte":
        weights = entry / "model.safetensors"
        _flip(weights, weights.stat().st_size - 7)  # inside the last tensor's data
    else:
        _edit_eps(entry / "config.json")
    capfd.readouterr()
    again = load_model(str(gguf), dtype="float64")
    assert "rebuilding the cached model" in capfd.readouterr().err
    assert torch.equal(again.run(tokens), clean)  # the numbers of the intact conversion, not the damaged one
    assert again.info.weights_hash == cache.file_hash(entry / "model.safetensors")  # the hash of what was read


# ----- 2. a model that is not causal --------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_an_encoder_is_refused_at_load(bert):
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(bert))


@pytest.mark.parametrize("command", [["check"], ["decompose", "--prompt", "w5 w6 w7"],
                                     ["ablate", "--data", TINY_TEXT, "--window", "8", "--max-windows", "2"]])
def test_an_encoder_exits_2_in_every_command(bert, tmp_path, command):
    out = tmp_path / "out"
    args = [*command, "--model", bert] + (["--out", out] if command[0] == "ablate" else [])
    one_error(run_cli(*args), "not a causal language model")
    assert not out.exists()


# ----- 3, 4, 5. lens files: checksum, their own held-out texts, values that make no sense ----------------
@pytest.fixture(scope="module")
def lens_run(folder, tmp_path_factory):
    """A lens trained on 6 texts holding out every 2nd: (lens file, texts file, lens_train.json)."""
    base = tmp_path_factory.mktemp("lens")
    texts = base / "texts.jsonl"
    lines = [" ".join(f"w{3 + (7 * i + 3 * k) % 60}" for k in range(12)) for i in range(6)]
    texts.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    out = base / "lens"
    result = run_cli("lens", "train", "--model", folder, "--data", texts, "--window", "8", "--steps", "3",
                 "--batch-tokens", "8", "--hold-out-every", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return out / "lens.safetensors", texts, json.loads((out / "lens_train.json").read_text())


def test_a_lens_file_with_one_flipped_byte_is_refused(folder, lens_run, tmp_path):
    from streamlens.tunedlens import TunedLens

    damaged = tmp_path / "lens.safetensors"
    shutil.copy(lens_run[0], damaged)
    _flip(damaged, damaged.stat().st_size - 3)  # in the tensors' bytes
    with pytest.raises(ValueError, match="damaged"):
        TunedLens.load(damaged)
    one_error(run_cli("lens", "eval", "--lens", damaged, "--model", folder, "--window", "8", "--out", tmp_path / "o"),
              "damaged")
    assert not (tmp_path / "o").exists()


def test_a_lens_carries_its_settings_and_texts(lens_run):
    from streamlens.tunedlens import TunedLens, text_hash

    lens = TunedLens.load(lens_run[0])
    texts = [json.loads(line)["text"] for line in lens_run[1].read_text().splitlines()]
    assert (lens.steps, lens.batch_tokens, lens.window, lens.hold_out_every) == (3, 8, 8, 2)
    assert lens.train_texts == tuple(text_hash(texts[i]) for i in (0, 2, 4))
    assert lens.held_out_texts == tuple(text_hash(texts[i]) for i in (1, 3, 5))
    assert lens_run[2]["training"]["train_texts_sha256"] == list(lens.train_texts)


def test_lens_eval_reads_the_lenss_own_held_out_texts_and_names_them(folder, lens_run, tmp_path):
    from streamlens.tunedlens import TunedLens

    out = tmp_path / "eval"
    result = run_cli("lens", "eval", "--lens", lens_run[0], "--model", folder, "--window", "8", "--out", out)
    assert result.exit_code == 0, result.output
    named = json.loads((out / "lens_eval.json").read_text())["comparison"]["texts_sha256"]
    assert named == list(TunedLens.load(lens_run[0]).held_out_texts)
    assert lens_run[2]["comparison"]["texts_sha256"] == named  # train's own evaluation read the same texts


def test_lens_eval_refuses_training_texts(folder, lens_run, tmp_path):
    one_error(run_cli("lens", "eval", "--lens", lens_run[0], "--model", folder, "--data", lens_run[1], "--window", "8",
                  "--out", tmp_path / "o"), "3 of the 6 evaluation texts were used to train the lens")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lr", ["2", "0", "-1", "nan", "inf"])
def test_lens_train_refuses_a_diverging_lr_before_loading(tmp_path, lr):
    one_error(run_cli("lens", "train", "--model", tmp_path / "no-model", "--lr", lr, "--out", tmp_path / "o"), "--lr",
              "at most 0.1")


def test_a_diverged_lens_run_writes_nothing(folder, lens_run, tmp_path, monkeypatch):
    from streamlens.tunedlens import LensDivergedError, check_converged, train

    with pytest.raises(LensDivergedError):
        check_converged([1.0, 3.0, 40.0], 0.1)
    with pytest.raises(LensDivergedError):
        check_converged([1.0, float("nan"), 0.5], 0.1)
    check_converged([1.0, 0.9, 0.7], 0.1)
    monkeypatch.setattr(train, "DIVERGED", 0.0)  # every run now counts as diverged: the CLI path must write nothing
    out = tmp_path / "o"
    result = run_cli("lens", "train", "--model", folder, "--data", lens_run[1], "--window", "8", "--steps", "2",
                 "--batch-tokens", "8", "--out", out)
    last = result.output.strip().splitlines()[-1]  # after the progress bar of the steps that ran
    assert result.exit_code == 2 and last.startswith("error: training diverged") and "nothing was written" in last
    assert not out.exists()


@pytest.mark.parametrize("alpha", ["inf", "nan", "-1", "0", "1e9"])
def test_identity_refuses_an_alpha_that_makes_no_sense_before_loading(tmp_path, alpha):
    result = run_cli("identity", "--model", tmp_path / "no-model", "--alpha", alpha, "--out", tmp_path / "o")
    one_error(result, "--alpha")


def test_one_bootstrap_minimum_for_every_command(tmp_path):
    from streamlens.ablation import EvalOptions
    from streamlens.limits import check_n_boot

    assert check_n_boot(40) == 40  # the rule's own edge: 40 passes, 39 does not
    for refuse in (lambda: check_n_boot(39), lambda: EvalOptions(n_boot=39)):
        with pytest.raises(ValueError, match="--bootstrap 39 must be a whole number of at least 40"):
            refuse()
    for command in (["layers"], ["ablate"]):
        one_error(run_cli(*command, "--model", tmp_path / "no-model", "--bootstrap", "10", "--out", tmp_path / "o"),
                  "--bootstrap 10", "at least 40")


# ----- 6. tracebacks, crashes, hangs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mismatched(folder, tmp_path_factory) -> Path:
    broken = Path(shutil.copytree(folder, tmp_path_factory.mktemp("mismatch") / "model"))
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("command", [["check"], ["decompose", "--prompt", "w5 w6"],
                                     ["ablate", "--data", TINY_TEXT, "--window", "8", "--max-windows", "2"]])
def test_a_config_that_does_not_match_its_weights_is_one_line(mismatched, tmp_path, command):
    args = [*command, "--model", mismatched] + (["--out", tmp_path / "o"] if command[0] == "ablate" else [])
    one_error(run_cli(*args), "config does not match its weights", "mlp")


def test_a_truncated_weights_file_in_a_folder_is_one_line(folder, tmp_path):
    """Found by the hostile pass: safetensors' own error escaped as a traceback (rc 1)."""
    broken = Path(shutil.copytree(folder, tmp_path / "model"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_error(run_cli("decompose", "--model", broken, "--prompt", "w5 w6"), "could not be loaded", "deserializing")


def test_an_absurd_bootstrap_is_refused_up_front_and_leaves_nothing(folder, tmp_path, monkeypatch):
    import streamlens.model

    monkeypatch.setattr(streamlens.model, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "o"
    one_error(run_cli("ablate", "--model", folder, "--data", TINY_TEXT, "--bootstrap", "100000000000", "--out", out),
              "--bootstrap 100000000000", "GB", "use at most")
    assert not out.exists()


def test_a_bootstrap_too_big_for_these_texts_is_refused_before_the_sweep(folder, tiny_tokens, monkeypatch):
    from streamlens import ablation as A
    from streamlens import data as D
    from streamlens import limits

    model = load_model(str(folder))
    batch = D.window_batch(tiny_tokens)
    monkeypatch.setattr(limits, "available_memory", lambda: 8 * 40 * 2 * 3)  # room for the smallest run only
    with pytest.raises(ValueError, match="use at most"):
        A.sweep(model, batch, "block", n_boot=40, progress=lambda n: pytest.fail("evaluated before refusing"))


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed")


@needs_ray
def test_an_unreachable_ray_address_fails_in_seconds(folder, tmp_path):
    started = time.monotonic()
    one_error(run_cli("ablate", "--model", folder, "--data", TINY_TEXT, "--ray-address", "127.0.0.1:1", "--out",
                  tmp_path / "o"), "no Ray cluster at 127.0.0.1:1")
    assert time.monotonic() - started < 30


@needs_ray
def test_more_local_workers_than_cpus_are_refused(folder, tmp_path):
    one_error(run_cli("ablate", "--model", folder, "--data", TINY_TEXT, "--workers", "4096", "--out", tmp_path / "o"),
              "--workers 4096", "use at most")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("command", [["report"], ["check", "--out", "/proc/streamlens-out"],
                                     ["layers", "--out", "/proc/streamlens-out"]])
def test_an_unwritable_out_is_found_before_any_work(command, monkeypatch):
    import streamlens.model

    monkeypatch.setattr(streamlens.model, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    args = [*command, "--out", "/proc/r.html"] if command == ["report"] else command
    one_error(run_cli(*args), "not writable")


# ----- 7. leftovers and notices ---------------------------------------------------------------------
def test_failed_gguf_loads_leave_no_lock_files(gguf, tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="not a loadable GGUF model: it starts with"):
        load_model(str(fake))
    from streamlens.model import loading

    def broken(path: Path, out: Path) -> None:
        raise ModelLoadError(f"{path} is not a loadable GGUF model: truncated")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(gguf))
    assert [p.name for p in (cache.cache_dir() / "gguf").iterdir()] == []  # no lock, no half-built entry


def test_a_resumed_run_says_so(folder, tmp_path, monkeypatch):
    from streamlens.ablation import backends

    args = ["ablate", "--model", folder, "--data", TINY_TEXT, "--window", "8", "--max-windows", "4",
            "--batch-size", "2", "--bootstrap", "40", "--out", tmp_path / "o"]
    real, calls = backends.run_shard, []

    def dies_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(backends, "run_shard", dies_after_two)
    assert isinstance(run_cli(*args).exception, RuntimeError)
    monkeypatch.setattr(backends, "run_shard", real)
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from 2 finished shards in" in resumed.output


def test_a_replaced_ray_worker_is_noticed(capsys):
    from streamlens.ablation import backends

    backends.notice_replaced(None)
    backends.notice_replaced("node-7")
    assert capsys.readouterr().err.strip().splitlines() == [
        "streamlens: a Ray worker on node-7 died and was replaced; its shards were run again"]
