"""Exact logit decomposition and logit lens: the contributions add up to the model's real logits."""

from __future__ import annotations

import pytest
import torch

from streamlens.decomposition import decompose, logit_lens
from streamlens.results import LogitDecomposition, LogitLens


@pytest.mark.parametrize("by_head", [False, True])
def test_contributions_sum_to_real_logits(tiny, tiny_tokens, by_head):
    parts = decompose(tiny, tiny_tokens[:1], positions=[0, 4, -1], top_k=3, by_head=by_head)
    assert parts.contributions.shape[1:] == (3, 3)
    assert parts.error <= 1e-8
    real = tiny.run(tiny_tokens[:1])[0, [0, 4, 8]].gather(-1, parts.target_ids)
    assert (parts.logits - real).abs().max() <= 1e-12
    # the bias terms are really there for models that have them (so forgetting one would fail)
    bias_total = parts.contributions[-2:].abs().sum()
    assert (bias_total > 1e-3) == (tiny.info.norm == "layernorm")


def test_heads_refine_the_attention_contribution(tiny, tiny_tokens):
    coarse = decompose(tiny, tiny_tokens[:1], positions=-1)
    fine = decompose(tiny, tiny_tokens[:1], positions=-1, by_head=True)
    for layer in range(tiny.n_layers):
        attn = coarse.contributions[coarse.labels.index(f"attn {layer}")]
        rows = [i for i, (kind, lay) in enumerate(zip(fine.kinds, fine.layers))
                if lay == layer and kind in ("head", "attn_bias")]
        assert (fine.contributions[rows].sum(0) - attn).abs().max() <= 1e-10


def test_contrast_is_difference_of_targets(tiny, tiny_tokens):
    a = decompose(tiny, tiny_tokens[:1], target="w7")
    b = decompose(tiny, tiny_tokens[:1], target="w9")
    diff = decompose(tiny, tiny_tokens[:1], target="w7", contrast="w9")
    assert (diff.contributions - (a.contributions - b.contributions)).abs().max() <= 1e-12
    assert diff.error <= 1e-8


def test_accumulated_ends_at_logit_minus_biases(tiny, tiny_tokens):
    parts = decompose(tiny, tiny_tokens[:1], positions=[1, 2])
    assert parts.accumulated.shape[0] == tiny.n_layers + 1
    expected_end = parts.logits - parts.contributions[-2:].sum(0)
    assert (parts.accumulated[-1] - expected_end).abs().max() <= 1e-8


def test_decomposition_roundtrip_and_frame(tiny, tiny_tokens, tmp_path):
    parts = decompose(tiny, tiny_tokens[:1], positions=[0, -1], top_k=2)
    again = LogitDecomposition.load(parts.save(tmp_path / "parts.safetensors"))
    assert torch.equal(again.contributions, parts.contributions)
    table = parts.to_dataframe()
    assert len(table) == len(parts.labels) * 2 * 2
    sums = table.groupby(["position", "target"])["contribution"].sum()
    logits = table.groupby(["position", "target"])["logit"].first()
    assert (sums - logits).abs().max() <= 1e-8


def test_logit_lens_ends_at_the_model_output(tiny, tiny_tokens, tmp_path):
    lens = logit_lens(tiny, tiny_tokens[:1], top_k=3)
    assert lens.kl_to_final.shape == (tiny.n_layers + 1, tiny_tokens.shape[1])
    assert lens.kl_to_final[-1].abs().max() <= 1e-10
    assert (lens.target_ranks[-1] == 0).all()
    assert (lens.kl_to_final[:-1] >= -1e-12).all() and lens.kl_to_final[:-1].max() > 0
    final_top = tiny.run(tiny_tokens[:1])[0].softmax(-1).topk(3)
    assert (lens.top_probs[-1] - final_top.values).abs().max() <= 1e-10
    again = LogitLens.load(lens.save(tmp_path / "lens.safetensors"))
    assert torch.equal(again.kl_to_final, lens.kl_to_final)


def test_logit_lens_middle_layer_matches_manual_norm(tiny, tiny_tokens):
    """The lens at stage 1 is the final norm recomputed on the stream after block 0."""
    from streamlens.recording import record

    writes = record(tiny, tiny_tokens[:1])
    x = writes.stream(0)[0]
    if tiny.info.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    eps = 1e-5 if tiny.info.norm == "layernorm" else 1e-6
    normalized = tiny.norm_weight * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() + tiny.norm_bias
    probs = (normalized @ tiny.W_U + tiny.b_U).softmax(-1)
    lens = logit_lens(tiny, tiny_tokens[:1], writes=writes)
    assert (probs.gather(-1, lens.target_ids[:, None])[:, 0] - lens.target_probs[1]).abs().max() <= 1e-10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"positions": 9}, "position 9 out of range: the prompt has 9 tokens"),
        ({"positions": []}, "positions is empty"),
        ({"target": "w5 w6"}, "is not a single token"),
        ({"top_k": 0}, "top_k=0"),
    ],
)
def test_bad_decomposition_input(tiny, tiny_tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decompose(tiny, tiny_tokens[:1], **kwargs)
    assert not tiny.has_hooks()


@pytest.mark.real
def test_smollm2_paris_decomposition(smol):
    parts = decompose(smol, "The capital of France is")
    assert parts.target_strings[0] == ["' Paris'"]
    assert parts.error <= 1e-3
    assert len(parts.labels) == 1 + 2 * 30 + 2
    lens = logit_lens(smol, "The capital of France is", target=" Paris")
    assert lens.target_ranks[-1, -1] == 0 and lens.target_ranks[0, -1] > 0
    assert lens.target_strings[-1] == " Paris"
