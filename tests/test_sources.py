"""The source-position split of attention: parts sum exactly to each head's logit contribution."""

from __future__ import annotations

import pytest
import torch

from streamlens import sites
from streamlens.decomposition import decompose
from streamlens.results.sources import AttentionSources
from streamlens.sources import attention_sources


@pytest.mark.parametrize("position", [-1, 4])
def test_sources_sum_to_the_head_contribution(tiny, tiny_tokens, position):
    tokens = tiny_tokens[:1]
    split = attention_sources(tiny, tokens, target=7, position=position)
    assert split.error <= 1e-10
    parts = decompose(tiny, tokens, target=7, positions=position, by_head=True)
    for layer in range(tiny.n_layers):
        for head in range(tiny.n_heads):
            row = parts.labels.index(f"L{layer}H{head}")
            assert abs(float(parts.contributions[row, 0, 0]) - float(split.contributions[layer, head].sum())) <= 1e-10
    # a causal model reads nothing from the future
    assert float(split.contributions[..., split.position + 1:].abs().sum()) == 0.0


def test_same_plus_other_is_the_heads_write(tiny, tiny_tokens):
    """Independent check with plain hooks: z @ W_O summed over heads, split by the pattern's diagonal."""
    tokens = tiny_tokens[:1]
    split = attention_sources(tiny, tokens)
    kept = {}

    def keep(name):
        def hook(tensor, hook):
            kept[name] = tensor.detach().clone()
        return hook

    layer = tiny.n_layers - 1
    names = [sites.attn_z(layer), sites.attn_pattern(layer), sites.attn_v(layer)]
    with torch.inference_mode():
        tiny.run(tokens, hooks=[(name, keep(name)) for name in names])
    z, pattern, v = (kept[name][0] for name in names)
    W_O = tiny.W_O(layer)
    heads_write = torch.einsum("phd,hdm->pm", z, W_O)
    v = v.repeat_interleave(tiny.n_heads // v.shape[1], dim=1)
    same = torch.einsum("hp,phd,hdm->pm", torch.diagonal(pattern, dim1=-2, dim2=-1), v, W_O)
    assert torch.allclose(split.same_norm[layer], same.norm(dim=-1), atol=1e-10)
    assert torch.allclose(split.other_norm[layer], (heads_write - same).norm(dim=-1), atol=1e-10)


def test_save_load_and_table(tiny, tiny_tokens, tmp_path):
    split = attention_sources(tiny, tiny_tokens[:1])
    back = AttentionSources.load(split.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.contributions, split.contributions) and back.token_strings == split.token_strings
    table = split.to_dataframe()
    assert len(table) == split.contributions.numel()
    assert len(split.top_sources(3)) == 3


def test_bad_position(tiny, tiny_tokens):
    with pytest.raises(ValueError, match="position 9 out of range"):
        attention_sources(tiny, tiny_tokens[:1], position=9)


def test_figures_draw_from_the_result(tiny, tiny_tokens):
    from streamlens.plots import identity as identity_plots

    split = attention_sources(tiny, tiny_tokens[:1], position=5)
    heatmap = identity_plots.source_heatmap(split)
    assert len(heatmap.data[0].x) == 6  # sources up to the destination only
    assert len(identity_plots.source_norms(split).data) == 4
