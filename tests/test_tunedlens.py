"""The tuned lens: an untrained lens is the logit lens exactly; training lowers KL; seeded runs repeat bit for bit."""

from __future__ import annotations

import torch

from streamlens.decomposition import logit_lens
from streamlens.results import Provenance
from streamlens.tunedlens import LensComparison, TunedLens, compare_lenses, train_tuned_lens


def test_identity_lens_is_the_logit_lens(tiny, tiny_tokens):
    lens = TunedLens.identity(Provenance.of(tiny, "test"), tiny.n_layers, tiny.info.d_model, torch.float64)
    compared = compare_lenses(tiny, tiny_tokens, lens)
    assert torch.equal(compared.kl[0], compared.kl[1]) and torch.equal(compared.rank[0], compared.rank[1])
    for window in range(tiny_tokens.shape[0]):  # against the logit lens of streamlens.decomposition
        reference = logit_lens(tiny, tiny_tokens[window: window + 1])
        assert torch.allclose(compared.kl[1, :, window], reference.kl_to_final.double(), atol=1e-12)
    assert compared.mean_kl()[:, -1].abs().max() <= 1e-12  # the last stage is the model's output


def test_training_lowers_kl_and_repeats_exactly(tiny, tiny_tokens, tmp_path):
    first = train_tuned_lens(tiny, tiny_tokens, steps=30, lr=1e-2, batch_tokens=6, seed=3)
    again = train_tuned_lens(tiny, tiny_tokens, steps=30, lr=1e-2, batch_tokens=6, seed=3)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    other = train_tuned_lens(tiny, tiny_tokens, steps=30, lr=1e-2, batch_tokens=6, seed=4)
    assert not torch.equal(first.weight, other.weight)
    compared = compare_lenses(tiny, tiny_tokens, first)
    kl = compared.mean_kl()
    assert (kl[1, :-1] < kl[0, :-1]).all()  # on its own training tokens, lower at every stage but the last
    back = TunedLens.load(first.save(tmp_path / "lens.safetensors"))
    assert torch.equal(back.weight, first.weight) and back.provenance.seed == 3 and back.layer_labels == first.layer_labels
    table = LensComparison.load(compared.save(tmp_path / "c.safetensors")).to_dataframe()
    assert len(table) == 2 * (tiny.n_layers + 1) and (table.kl_low <= table.kl_high).all()
    from streamlens.plots import identity as identity_plots

    assert len(identity_plots.lens_kl(compared).data) == 4 and len(identity_plots.lens_rank(compared).data) == 2


def test_report_takes_a_trained_lens(tiny, tiny_tokens):
    """The standard report's identity sections: attention sources, identity, and both lenses when a lens is given."""
    from streamlens.pages.report import stream_sections

    lens = train_tuned_lens(tiny, tiny_tokens, steps=2, batch_tokens=4)
    titles = [section.title for section in stream_sections(tiny, tiny_tokens[:1], None, lens, lambda line: None)]
    assert len(titles) == 5 and any("tuned lens" in title for title in titles)
