"""Every family exact: tiny random float64 models of each family the bridge and transformers share.

Per family (`streamlens.testing.FAMILIES`): the writes sum to the final stream, per-head writes plus
the output bias give the attention write, the decomposition sums to the model's logits and to the
HF model's own logits (an independent HF load, which rounds its norms and softmax through float32),
the logit lens after the last block is the logits, the ablation engine agrees with an independent
hook loop (tests/test_ablation.py's `reference_per_text`), and `start_at_layer` skips earlier blocks.
Plus: float32 for three families, refusals (soft-capping, a family the bridge cannot run) and GGUF
files of three non-Llama families against the same weights from safetensors.
"""

from __future__ import annotations

import pytest
import torch

from streamlens import ablation as A
from streamlens import sites
from streamlens.data import window_batch
from streamlens.decomposition import decompose, logit_lens
from streamlens.model import ModelFidelityError, ModelLoadError, load_model
from streamlens.recording import record
from streamlens.sites import Site
from streamlens.testing import FAMILIES, tiny_gguf_file, tiny_model_folder
from test_ablation import reference_per_text  # the independent hook loop (tests/ is on sys.path)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, float64 model, its HF folder)."""
    folder = tiny_model_folder(tmp_path_factory.mktemp(request.param), arch=request.param)
    return request.param, load_model(str(folder), dtype="float64"), folder


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_loads_exactly_with_its_own_class(family):
    name, model, _ = family
    assert model.info.fidelity == "" and model.info.bridge_vs_hf <= 1e-12 and model.info.readout_error <= 1e-12
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_writes_sum_to_final_stream(family, tokens):
    _, model, _ = family
    writes = record(model, tokens)
    assert writes.identity_error() / float(writes.final.abs().max()) <= 1e-12
    # a missing write would show: the MLP write of layer 1 is not negligible
    assert float(writes.mlp[1].abs().max()) > 1e-3 * float(writes.final.abs().max())


def test_head_writes_sum_to_attention_write(family, tokens):
    _, model, _ = family
    writes = record(model, tokens, heads=True)
    for layer in range(model.n_layers):
        rebuilt = writes.head_writes(layer).sum(2) + writes.attn_bias_write(layer)
        assert _relative(rebuilt, writes.attn[layer]) <= 1e-12, layer


def test_decomposition_sums_to_model_and_hf_logits(family, tokens):
    from transformers import AutoModelForCausalLM

    _, model, folder = family
    parts = decompose(model, tokens[:1], positions=range(tokens.shape[1]), top_k=3, by_head=True)
    scale = float(parts.logits.abs().max())
    assert parts.error / scale <= 1e-10
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()  # HF as shipped
    with torch.no_grad():
        hf_logits = hf(tokens[:1]).logits[0]
    expected = hf_logits.gather(-1, parts.target_ids)
    assert float((parts.total - expected).abs().max()) / scale <= 1e-6  # HF's float32 norm/softmax rounding


def test_logit_lens_after_last_block_is_the_logits(family, tokens):
    _, model, _ = family
    writes = record(model, tokens)
    assert _relative(model.final_logits(writes.stream(model.n_layers - 1)), writes.logits) <= 1e-10
    lens = logit_lens(model, tokens[:1])
    assert float(lens.kl_to_final[-1].abs().max()) <= 1e-10


@pytest.mark.parametrize("method", A.METHODS)
def test_ablation_engine_matches_hook_loop(family, method):
    _, model, _ = family
    batch = window_batch(torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(3)))
    last = model.n_layers - 1
    specs = [A.Ablation((site,), method, "total")
             for site in (Site("block", 1), Site("attn", 0), Site("mlp", last), Site("head", 1, 2))]
    specs.append(A.Ablation((Site("attn", 1),), method, "direct"))
    result = A.evaluate(model, batch, specs, seed=2, batch_size=3, n_boot=40)
    for index, spec in enumerate(specs):
        expected = reference_per_text(model, batch, spec, seed=2)
        assert (result.per_text[index] - expected).abs().max() <= 1e-9, spec.label


def test_start_at_layer_skips_earlier_blocks(family, tokens):
    _, model, _ = family
    fired: list[int] = []
    hooks = [(sites.attn_out(k), lambda t, hook, k=k: fired.append(k)) for k in range(model.n_layers)]
    kept = {}
    clean = model.run(tokens, hooks=[(sites.resid_pre(2), lambda t, hook: kept.__setitem__(2, t.clone()))])
    resumed = model.run(kept[2], hooks=hooks, start_at_layer=2)
    assert fired == [2] and _relative(resumed, clean) <= 1e-12


# ----- float32 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_float32_within_float32_tolerance(arch, tmp_path, tokens):
    model = load_model(str(tiny_model_folder(tmp_path, arch=arch)), dtype="float32")
    assert model.info.fidelity == "" and model.info.bridge_vs_hf <= 1e-4
    writes = record(model, tokens, heads=True)
    assert writes.identity_error() / float(writes.final.abs().max()) <= 1e-5
    head_sum = writes.heads.sum(3) + torch.stack([writes.attn_bias_write(L) for L in range(model.n_layers)])
    assert _relative(head_sum, writes.attn) <= 1e-5
    parts = decompose(model, tokens[:1], top_k=2, writes=None)
    assert parts.error / float(parts.logits.abs().max()) <= 1e-5


# ----- refusals ---------------------------------------------------------------------------------
def test_soft_capped_logits_are_refused_or_labelled(tmp_path, tokens):
    folder = tiny_model_folder(tmp_path, arch="gemma2", final_logit_softcapping=3.0)
    with pytest.raises(ModelFidelityError, match="soft-capping .* non-linear in the stream") as error:
        load_model(str(folder), dtype="float64")
    assert "Gemma2ForCausalLM" in str(error.value)
    model = load_model(str(folder), dtype="float64", strict=False)
    assert model.info.fidelity.startswith("NOT EXACT") and model.info.readout_error > 1e-3
    parts = decompose(model, tokens[:1], top_k=2)
    assert parts.provenance.fidelity == model.info.fidelity  # every result says so
    assert all(label.endswith("(pre-cap logit)") for label in parts.target_strings[0])
    assert parts.error / float(parts.logits.abs().max()) <= 1e-10  # exact on the pre-cap logit ...
    capped = record(model, tokens[:1]).logits[0, -1].gather(-1, parts.target_ids[0])
    assert float((capped - parts.logits[0]).abs().max()) > 1e-3  # ... which is not the capped one


def test_direct_head_effect_through_post_norm_is_refused(tmp_path):
    model = load_model(str(tiny_model_folder(tmp_path, arch="olmo2")), dtype="float64")
    with pytest.raises(ValueError, match="post-norm"):
        A.Ablation((Site("head", 0, 1),), "zero", "direct").check(model)


def test_family_the_bridge_cannot_run_is_refused_listing_those_that_work(tmp_path):
    from transformers import BioGptConfig, BioGptForCausalLM

    from streamlens.testing import tiny_tokenizer

    config = BioGptConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64)
    BioGptForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="BioGptForCausalLM, which the transformer-lens bridge cannot run") as error:
        load_model(str(tmp_path))
    assert all(name in str(error.value) for name in ("llama", "gemma2", "gpt_neox", "olmo2"))


# ----- GGUF beyond Llama ------------------------------------------------------------------------
GGUF_OVERRIDES = {  # config fields a GGUF file does not carry, set to the values transformers assumes
    "qwen2": {},
    "gpt2": {"n_positions": 1024},
    "gemma3_text": {"query_pre_attn_scalar": 256, "layer_types": None},
}


@pytest.mark.parametrize("arch", list(GGUF_OVERRIDES))
def test_gguf_of_other_families_loads_like_safetensors(arch, tmp_path, monkeypatch, tokens):
    monkeypatch.setenv("STREAMLENS_CACHE", str(tmp_path / "cache"))
    gguf_path = tiny_gguf_file(tmp_path / f"tiny-{arch}.gguf", arch, **GGUF_OVERRIDES[arch])
    from_gguf = load_model(str(gguf_path))
    from_safetensors = load_model(str(tiny_model_folder(tmp_path / "hf", arch, **GGUF_OVERRIDES[arch])))
    assert from_gguf.info.architecture == from_safetensors.info.architecture
    assert from_gguf.info.fidelity == ""
    assert _relative(from_gguf.run(tokens), from_safetensors.run(tokens)) <= 1e-6
