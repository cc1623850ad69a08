"""Token identity: the probe against an independent least-squares fit, the skip-removed stream, the result."""

from __future__ import annotations

import torch

from streamlens import sites
from streamlens.data import TextWindows
from streamlens.identity import TokenIdentity, fit_probe, stage_features, token_identity, word_starts
from streamlens.recording import record


def test_probe_is_ridge_regression_onto_one_hot():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=generator) * 3
    probe = fit_probe(features, labels, alpha=0.5)
    x = (features - features.mean(0)) / features.std(0, unbiased=False)
    x = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(labels.unique(return_inverse=True)[1]).double()
    penalty = 0.5 * 40 * torch.eye(6, dtype=torch.float64)
    penalty[-1, -1] = 0
    expected = torch.linalg.lstsq(torch.cat([x, penalty.sqrt()]), torch.cat([y, torch.zeros(6, 4, dtype=torch.float64)])).solution
    assert torch.allclose(probe.weight, expected, atol=1e-10)
    top1, top5, majority, ok = probe.hits(features, torch.cat([labels[:-1], torch.tensor([1])]))
    assert not ok[-1] and not top1[-1] and ok[:-1].all() and top5[:-1].all()  # 4 classes: top-5 always hits


def test_skip_removed_stream_is_the_blocks_writes(tiny, tiny_tokens):
    """With the skip around block 1 removed, the stream after it is attn_out 1 + mlp_out 1 of that run."""
    kept = {}

    def keep(name):
        def hook(tensor, hook):
            kept[name] = tensor.detach().clone()
        return hook

    streams = stage_features(tiny, tiny_tokens, removed=1)
    from streamlens.ablation.apply import skip_removal_hooks

    names = [sites.attn_out(1), sites.mlp_out(1)]
    with torch.no_grad():
        tiny.run(tiny_tokens, hooks=skip_removal_hooks(tiny, [1], {}) + [(n, keep(n)) for n in names])
    assert torch.allclose(streams[2], kept[names[0]] + kept[names[1]], atol=1e-12)
    clean = stage_features(tiny, tiny_tokens, removed=None)
    writes = record(tiny, tiny_tokens)
    assert torch.equal(clean[0], writes.embedding) and torch.equal(clean[tiny.n_layers], writes.final)
    assert not torch.allclose(streams[tiny.n_layers], clean[tiny.n_layers])


def test_token_identity_result(tiny, tmp_path):
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, 20, (6, 8), generator=generator)  # few token ids: every one is seen in training
    windows = TextWindows(tokens, torch.tensor([0, 0, 1, 1, 2, 2]), 3, "random")
    result = token_identity(tiny, windows, removed=(1,), n_boot=50)
    top1 = result.get("probe_top1")
    assert (result.low <= result.high).logical_or(result.low.isnan()).all()
    assert (top1 >= 0).all() and (top1 <= 1).all()
    # at the embedding of a word-level model the stream is the token's embedding row: cosine 1
    if tiny.info.norm == "rms":
        assert abs(float(result.get("cosine")[0]) - 1.0) < 1e-9
    assert torch.isnan(result.get("probe_top1", condition="no skip 1")[1])  # only after block 1 and the end
    assert not torch.isnan(result.get("probe_top1", condition="no skip 1")[2])
    back = TokenIdentity.load(result.save(tmp_path / "identity.safetensors"))
    assert torch.equal(back.value.nan_to_num(-1), result.value.nan_to_num(-1)) and back.conditions == result.conditions
    assert set(result.to_dataframe().measure) == set(result.measures)
    from streamlens.plots import identity as identity_plots

    for figure in (identity_plots.identity_curves(result), identity_plots.identity_splits(result), identity_plots.skip_removed(result)):
        assert figure.data


def test_word_starts(tiny):
    starts = word_starts(tiny, torch.tensor([[5, 6, 7]]))
    assert starts[0, 0]
