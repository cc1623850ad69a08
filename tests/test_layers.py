"""The layer study against independent computations on tiny float64 models (both norm families).

Swaps and spans: each text alone, full forwards whose hooks overwrite a stream (no restart, no
caching, no batching), metrics from full logits with torch's cross_entropy. Scores: from streams
recorded by `run_with_cache`. Self-repair: the parts add up to the total effect.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamlens import ablation as A
from streamlens import importance as LY
from streamlens import sites
from streamlens.ablation import swap as SW
from streamlens.data import window_batch
from streamlens.sites import Site

TOL = 1e-9


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(5)
    return window_batch(torch.randint(3, 64, (4, 8), generator=generator))


def _replace(tensor):
    return lambda t, hook: tensor.clone()


def _stream_at(model, tokens, name, hooks=()):
    kept = {}
    model.run(tokens, hooks=[*hooks, (name, lambda t, hook: kept.__setitem__("x", t.clone()))])
    return kept["x"]


def _reference_logits(model, tokens, swap=None, span=None):
    """Full forwards of one text [1, pos]: a swap of blocks L, L+1, or a span of blocks skipped."""
    n = model.n_layers
    if span is not None:
        start, stop = span  # blocks start..stop-1 removed: the stream entering `stop` is resid_pre start
        x = _stream_at(model, tokens, sites.resid_pre(start))
        if stop == n:
            return model.final_logits(x)
        return model.run(tokens, hooks=[(sites.resid_pre(stop), _replace(x))])
    layer = swap
    x = _stream_at(model, tokens, sites.resid_pre(layer))
    a = _stream_at(model, tokens, sites.resid_post(layer + 1), [(sites.resid_pre(layer + 1), _replace(x))])
    b = _stream_at(model, tokens, sites.resid_post(layer), [(sites.resid_pre(layer), _replace(a))])
    if layer + 2 == n:
        return model.final_logits(b)
    return model.run(tokens, hooks=[(sites.resid_pre(layer + 2), _replace(b))])


def _reference_loss_and_top1(model, batch, **change):
    out = []
    for i in range(batch.n_texts):
        tokens = batch.tokens[i : i + 1]
        clean = model.run(tokens)[0, :-1]
        changed = _reference_logits(model, tokens, **change)[0, :-1]
        labels = batch.labels[i, :-1]
        loss = (F.cross_entropy(changed, labels, reduction="none") - F.cross_entropy(clean, labels, reduction="none"))
        out.append(torch.stack([loss.mean(), (changed.argmax(-1) == clean.argmax(-1)).double().mean()]))
    return torch.stack(out, dim=1)  # [2, text]


def test_swaps_match_reference(tiny, windows):
    specs = [SW.Swap(layer) for layer in range(tiny.n_layers - 1)]
    result = SW.evaluate(tiny, windows, specs, metrics=("loss_increase", "top1_agreement"), n_boot=40)
    assert result.methods == ("swap",) * len(specs)
    for index, spec in enumerate(specs):
        expected = _reference_loss_and_top1(tiny, windows, swap=spec.layer)
        assert (result.per_text[index] - expected).abs().max() < TOL, spec.label
    assert not tiny.has_hooks()


def test_swap_of_out_of_range_layer_names_the_range(tiny):
    with pytest.raises(ValueError, match="swap layers 0-"):
        SW.Swap(tiny.n_layers - 1).check(tiny)


def test_spans_match_reference(tiny, windows):
    n = tiny.n_layers
    spans = [(0, 1), (1, 3), (0, n), (n - 2, n)]
    specs = [LY.span_ablation(start, stop - start) for start, stop in spans]
    result = SW.evaluate(tiny, windows, specs, metrics=("loss_increase", "top1_agreement"), n_boot=40)
    for index, span in enumerate(spans):
        expected = _reference_loss_and_top1(tiny, windows, span=span)
        assert (result.per_text[index] - expected).abs().max() < TOL, span


def test_scores_equal_direct_computation(tiny, windows):
    scores = LY.stream_scores(tiny, windows)
    n = tiny.n_layers
    for i in range(windows.n_texts):
        _, cache = tiny.run_with_cache(windows.tokens[i : i + 1])
        stream = [cache[sites.resid_pre(layer)][0] for layer in range(n)] + [cache[sites.FINAL_STREAM][0]]
        for layer in range(n):
            bi = (1 - F.cosine_similarity(stream[layer], stream[layer + 1], dim=-1)).mean()
            assert abs(float(scores.block_influence[layer, i]) - float(bi)) < TOL
            write = stream[layer + 1] - stream[layer]
            rel = (write.norm(dim=-1) / stream[layer].norm(dim=-1)).mean()
            assert abs(float(scores.relative_norm[0, layer, i]) - float(rel)) < TOL
            for span in range(1, n - layer + 1):
                cos = F.cosine_similarity(stream[layer], stream[layer + span], dim=-1).clamp(-1, 1)
                angular = (torch.arccos(cos) / math.pi).mean()
                assert abs(float(scores.angular_distance[span - 1, layer, i]) - float(angular)) < TOL
            attn = cache[sites.attn_out(layer)][0]
            rel_attn = (attn.norm(dim=-1) / stream[layer].norm(dim=-1)).mean()
            assert abs(float(scores.relative_norm[1, layer, i]) - float(rel_attn)) < TOL
        assert torch.isnan(scores.angular_distance[n - 1, 1:]).all()  # spans past the last block


def test_spearman_matches_a_direct_rank_correlation():
    x = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    rx = torch.tensor([1.0, 0.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    ry = torch.tensor([0.0, 2.0, 1.0, 4.0, 3.0], dtype=torch.float64)
    d2 = ((rx - ry) ** 2).sum()
    assert abs(float(LY.spearman(x, y)) - float(1 - 6 * d2 / (5 * 24))) < 1e-12
    assert abs(float(LY.spearman(x, x)) - 1.0) < 1e-12


@pytest.mark.parametrize("kind", ["head", "attn", "mlp"])
def test_self_repair_parts_sum_to_total(tiny, windows, kind):
    units = A.units(tiny, kind)[:4]
    repair = LY.self_repair(tiny, windows, units, n_boot=40)
    parts = repair.direct + repair.norm + repair.downstream  # [unit, text]
    assert (parts - repair.total).abs().max() < TOL
    # the total effect is the engine's own ablated run: its label logit change, checked against a hooked forward
    site = units[0]
    spec = A.Ablation((site,), "resample", "total")
    with A.ablated(tiny, spec, reference=windows, seed=0):
        logits = tiny.run(windows.tokens)
    clean = tiny.run(windows.tokens)
    labels = windows.labels[:, :-1]
    change = (logits[:, :-1].gather(-1, labels[..., None]) - clean[:, :-1].gather(-1, labels[..., None]))[..., 0]
    assert (repair.total[0] - change.mean(-1)).abs().max() < TOL
