"""Figures show what the results hold: sizes follow the model, bars add up, colours follow the style."""

from __future__ import annotations

import math

import pytest
import torch

from streamlens.decomposition import decompose, logit_lens
from streamlens.model import load_model
from streamlens.plots import decomposition as decomposition_plots
from streamlens.plots import lens as lens_plots
from streamlens.plots import stream as stream_plots
from streamlens.plots.style import color
from streamlens.recording import record
from streamlens.testing import tiny_model_folder


SIZES = {  # (architecture, layers, d_model, heads): both norm families, three shapes
    "llama-3x4": ("llama", 3, 32, 4),
    "gpt2-2x3": ("gpt2", 2, 24, 3),
    "llama-5x6": ("llama", 5, 48, 6),
}


@pytest.fixture(scope="module", params=list(SIZES))
def model(request, tmp_path_factory):
    arch, n_layers, d_model, n_heads = SIZES[request.param]
    folder = tiny_model_folder(tmp_path_factory.mktemp(request.param), arch=arch, n_layers=n_layers,
                               d_model=d_model, n_heads=n_heads, seed=3)
    return load_model(str(folder), dtype="float64")


@pytest.fixture(scope="module")
def prompt_tokens(model):
    return model.to_tokens("w5 w17 w33 w8 w40 w12")


def assert_traces_filled(fig):
    assert fig.data, "figure has no traces"
    for trace in fig.data:
        sizes = [len(getattr(trace, axis)) for axis in ("x", "y", "z") if getattr(trace, axis, None) is not None]
        assert sizes and min(sizes) > 0, f"empty trace {trace.name!r}"
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def bars(fig, name):
    return next(trace for trace in fig.data if trace.name == name)


# ----- stream anatomy -------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", [-1, 0, None])
def test_stream_figures_have_one_bar_per_write(model, prompt_tokens, pos):
    writes = record(model, prompt_tokens)
    n_writes = len(writes.components().labels)
    assert n_writes == 1 + model.has_pos_embed + 2 * model.n_layers
    for function in (stream_plots.write_norms, stream_plots.write_cosines, stream_plots.stream_growth):
        fig = function(writes, pos=pos)
        assert_traces_filled(fig)
        drawn = [x for trace in fig.data if trace.type == "bar" for x in trace.x]
        assert sorted(drawn) == sorted(writes.components().labels)
        assert bars(fig, "attn").marker.color == color("attn") and bars(fig, "mlp").marker.color == color("mlp")


def test_stream_norm_line_ends_at_final_and_growth_sums_to_it(model, prompt_tokens):
    writes = record(model, prompt_tokens)
    final_norm = float(writes.final[0, -1].norm())
    line = bars(stream_plots.write_norms(writes), "stream after")
    assert math.isclose(line.y[-1], final_norm, rel_tol=1e-9)
    growth = stream_plots.stream_growth(writes)
    total = sum(y for trace in growth.data for y in trace.y)
    assert math.isclose(total, final_norm, rel_tol=1e-9)
    cosines = [y for trace in stream_plots.write_cosines(writes).data for y in trace.y]
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in cosines)


def test_stream_bad_position_names_the_range(model, prompt_tokens):
    with pytest.raises(ValueError, match=r"pos 6 out of range: the record has 6 positions \(-6 to 5\)"):
        stream_plots.write_norms(record(model, prompt_tokens), pos=6)


# ----- decomposition --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def by_head(model, prompt_tokens):
    return decompose(model, prompt_tokens, target="w9", positions=[-1, 2], by_head=True)


@pytest.mark.parametrize("pos_index", [0, 1])
def test_waterfall_stairs_land_on_the_real_logit(by_head, pos_index):
    fig = decomposition_plots.waterfall(by_head, pos_index=pos_index)
    assert_traces_filled(fig)
    real = float(by_head.logits[pos_index, 0])
    total = bars(fig, "total (real logit)")
    assert list(total.x) == ["total"] and total.y[0] == real and total.base[0] == 0
    # every bar starts where the previous one (in stream order) ended; the last one ends on the logit
    steps = sorted(
        (list(fig.layout.xaxis.categoryarray).index(x), base, y)
        for trace in fig.data if trace.type == "bar" and trace.name != "total (real logit)"
        for x, base, y in zip(trace.x, trace.base, trace.y)
    )
    end = 0.0
    for _, base, y in steps:
        assert math.isclose(base, end, abs_tol=1e-12)
        end = base + y
    assert math.isclose(end, real, abs_tol=1e-9)
    assert bars(fig, "attn").marker.color == color("attn") and bars(fig, "bias").marker.color == color("bias")


def test_layer_bars_cover_every_layer_and_sum_to_the_logit(model, by_head):
    fig = decomposition_plots.layer_bars(by_head)
    assert_traces_filled(fig)
    assert list(bars(fig, "attn").x) == [str(layer) for layer in range(model.n_layers)]
    assert list(bars(fig, "mlp").x) == [str(layer) for layer in range(model.n_layers)]
    total = sum(y for trace in fig.data for y in trace.y)
    assert math.isclose(total, float(by_head.logits[-1, 0]), abs_tol=1e-9)


def test_head_heatmap_is_layers_by_heads(model, by_head):
    fig = decomposition_plots.head_heatmap(by_head)
    assert_traces_filled(fig)
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)
    assert z.shape == (model.n_layers, model.n_heads)
    label = f"L{model.n_layers - 1}H{model.n_heads - 1}"
    assert z[-1, -1] == by_head.contributions[by_head.labels.index(label), -1, 0]
    heads = [i for i, kind in enumerate(by_head.kinds) if kind == "head"]
    assert math.isclose(float(z.sum()), float(by_head.contributions[heads, -1, 0].sum()), abs_tol=1e-12)


def test_head_heatmap_needs_heads_and_picks_are_checked(model, prompt_tokens):
    plain = decompose(model, prompt_tokens, target="w9")
    with pytest.raises(ValueError, match="by_head=True"):
        decomposition_plots.head_heatmap(plain)
    with pytest.raises(ValueError, match=r"pos_index 1 out of range: the decomposition has 1 positions"):
        decomposition_plots.waterfall(plain, pos_index=1)


def test_contrast_is_called_a_logit_difference(model, prompt_tokens):
    contrast = decompose(model, prompt_tokens, target="w9", contrast="w10")
    fig = decomposition_plots.waterfall(contrast)
    assert fig.layout.yaxis.title.text == "logit difference"
    assert bars(fig, "total (real logit)").y[0] == float(contrast.logits[0, 0])


# ----- logit lens -----------------------------------------------------------------------------------
def test_lens_heatmap_is_stages_by_positions(model, prompt_tokens):
    lens = logit_lens(model, prompt_tokens, top_k=3)
    for value in ("prob", "rank"):
        fig = lens_plots.lens_heatmap(lens, value=value)
        assert_traces_filled(fig)
        z = torch.tensor(fig.data[0].z, dtype=torch.float64)
        assert z.shape == (model.n_layers + 1, prompt_tokens.shape[1])
        assert list(fig.data[0].y) == ["embed", *map(str, range(model.n_layers))]
    prob = torch.tensor(lens_plots.lens_heatmap(lens).data[0].z, dtype=torch.float64)
    assert torch.equal(prob, lens.target_probs.double())
    # target=None follows the final top token: its rank under the last stage is 0 (darkest cell)
    rank = torch.tensor(lens_plots.lens_heatmap(lens, "rank").data[0].z, dtype=torch.float64)
    assert torch.equal(rank[-1], torch.zeros(prompt_tokens.shape[1], dtype=rank.dtype))
    top = lens_plots.lens_heatmap(lens).data[0].text
    assert top[-1][0] == repr(lens.top_strings[-1][0][0])[1:-1]


def test_kl_figure_has_every_stage_and_ends_at_zero(model, prompt_tokens):
    lens = logit_lens(model, prompt_tokens)
    fig = lens_plots.kl_to_final(lens)
    assert_traces_filled(fig)
    assert len(fig.data) == prompt_tokens.shape[1] + 1
    mean = fig.data[-1]
    assert len(mean.x) == model.n_layers + 1 and abs(mean.y[-1]) < 1e-9
    with pytest.raises(ValueError, match="value 'logit'"):
        lens_plots.lens_heatmap(lens, value="logit")
