"""The boundary module: loading, validation, hooks restored, start_at_layer exact and really skipping."""

from __future__ import annotations

import pytest
import torch

from streamlens import sites
from streamlens.model import ModelLoadError, load_model
from streamlens.recording import record


def test_both_norm_families_load_as_float64(tiny):
    assert tiny.info.norm in {"rms", "layernorm"}
    assert all(p.dtype == torch.float64 for p in tiny.parameters())
    assert tiny.W_U.shape == (tiny.info.d_model, tiny.info.d_vocab)
    assert tiny.W_O(0).shape == (tiny.n_heads, tiny.info.d_head, tiny.info.d_model)


def test_start_at_layer_reproduces_logits_and_restores_blocks(tiny, tiny_tokens):
    clean = tiny.run(tiny_tokens)
    kept = {}
    hooks = [(sites.resid_pre(k), lambda t, hook, k=k: kept.__setitem__(k, t.clone())) for k in range(tiny.n_layers)]
    tiny.run(tiny_tokens, hooks=hooks)
    for layer in range(tiny.n_layers):
        resumed = tiny.run(kept[layer], start_at_layer=layer)
        assert (resumed - clean).abs().max() < 1e-12
    # skipped blocks are back: a full run still fires layer-0 hooks and gives the same logits
    fired = []
    again = tiny.run(tiny_tokens, hooks=[(sites.attn_out(0), lambda t, hook: fired.append(1))])
    assert fired and torch.equal(again, clean)


def test_start_at_layer_skips_earlier_blocks(tiny, tiny_tokens):
    """Blocks before the start are not computed (the bridge alone would run them)."""
    fired = []
    hooks = [(sites.attn_out(k), lambda t, hook, k=k: fired.append(k)) for k in range(tiny.n_layers)]
    resid = torch.zeros(*tiny_tokens.shape, tiny.info.d_model, dtype=torch.float64)
    tiny.run(resid, hooks=hooks, start_at_layer=2)
    assert fired == [2]


def test_hooks_removed_after_exception(tiny, tiny_tokens):
    def boom(tensor, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny.run(tiny_tokens, hooks=[(sites.mlp_out(1), boom)])
    assert not tiny.has_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        tiny.run(torch.zeros(2, 9, tiny.info.d_model, dtype=torch.float64), hooks=[(sites.mlp_out(1), boom)],
                 start_at_layer=1)
    assert not tiny.has_hooks()
    assert torch.equal(tiny.run(tiny_tokens), record(tiny, tiny_tokens).logits)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.check_layer(3), "layer 3 out of range: model has 3 layers (0-2)"),
        (lambda m: m.check_head(4), "head 4 out of range: model has 4 heads per layer (0-3)"),
        (lambda m: m.to_tokens("   "), "empty prompt"),
        (lambda m: m.to_tokens(" ".join(["w5"] * 200)), "longer than the model's context of 128 tokens"),
        (lambda m: m.token_id("w5 w6"), "is not a single token"),
        (lambda m: m.run(torch.tensor([[5, 999]])), "token id 999 out of range"),
        (lambda m: m.run(torch.tensor([[5]]), hooks=[("blocks.9.hook_nothing", print)]), "unknown hook point"),
    ],
)
def test_bad_input_names_the_value(tiny, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(tiny)


def test_bad_model_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(ModelLoadError, match="is not a model"):
        load_model(str(not_a_model))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a loadable GGUF"):
        load_model(str(fake))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="unknown dtype 'float16'"):
        load_model(str(tmp_path), dtype="float16")


@pytest.mark.real
def test_smollm2_facts(smol):
    info = smol.info
    assert (info.n_layers, info.d_model, info.norm) == (30, 576, "rms")
    tokens = smol.to_tokens("The capital of France is")
    assert tokens[0, 0].item() != smol.tokenizer.bos_token_id  # no BOS added behind our back
    logits = smol.run(tokens)
    assert smol.decode(int(logits[0, -1].argmax())) == " Paris"


@pytest.mark.real
def test_gguf_cache_is_reused(smol, monkeypatch):
    """The second load reads the converted safetensors from the cache: it converts nothing (a timed
    assertion would only measure how busy the machine is; benchmarks/bench_load.py times it)."""
    from streamlens.model import loading

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached GGUF was converted again")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    again = load_model()
    assert again.info.source == smol.info.source
    assert again.info.weights_hash == smol.info.weights_hash


def test_hub_name_loads_offline_from_the_hf_cache(tmp_path, monkeypatch):
    """An HF hub name works without network when its files are in the local HF cache."""
    from streamlens.testing import tiny_model_folder

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    tiny_model_folder(snapshot, arch="llama")
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("tiny-org/tiny-llama")
    assert model.info.name == "tiny-org/tiny-llama" and model.n_layers == 3
    assert model.run(model.to_tokens("w5 w6")).shape == (1, 2, 64)


def test_bfloat16_runs_and_records(tmp_path, tiny_tokens):
    from streamlens.testing import tiny_model_folder

    model = load_model(str(tiny_model_folder(tmp_path, arch="gpt2")), dtype="bfloat16")
    writes = record(model, tiny_tokens)
    assert writes.attn.dtype == torch.bfloat16
    assert writes.identity_error() / float(writes.final.abs().max()) < 0.05  # bf16 rounding only


def test_a_float64_checkpoint_keeps_its_last_bits(tmp_path, tiny_tokens):
    """A float64 model saved in float64 (a healed or trained float64 model) loads as float64 without a
    float32 round trip: the handle's and the HF copy's weights are the stored ones, bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from streamlens.model.folders import stores_float64
    from streamlens.model.fidelity import exact_float64_norms
    from streamlens.model.hf import hf_context, plain_copy
    from streamlens.testing import tiny_model_folder, tiny_tokenizer

    source = tiny_model_folder(tmp_path / "f32", arch="llama", n_layers=2)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float64)
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)  # bits float32 cannot hold
    hf.save_pretrained(tmp_path / "f64")
    tiny_tokenizer().save_pretrained(tmp_path / "f64")
    assert not stores_float64(source) and stores_float64(tmp_path / "f64") and not stores_float64("smollm2")
    stored = load_file(next((tmp_path / "f64").glob("*.safetensors")))
    model = load_model(str(tmp_path / "f64"), dtype="float64")
    weights = dict(plain_copy(model).named_parameters())
    assert all(torch.equal(weights[name], tensor) for name, tensor in stored.items() if name in weights)
    exact_float64_norms(hf)  # HF's RMSNorm rounds through float32; the handle's float64 norms are exact
    with torch.no_grad(), hf_context(model):
        reference = hf.eval()(tiny_tokens).logits  # the stored weights' own forward
    assert (model.run(tiny_tokens) - reference).abs().max() / reference.abs().max() < 1e-12
