"""The public `Engine`: one loop for every spec kind, greedy removal restarting from the removed units'
stream, swaps through a backend, and backend choice in the library (tiny float64 models)."""

from __future__ import annotations

import pytest
import torch

from streamlens import ablation as A
from streamlens.ablation import backends as B
from streamlens.ablation import placement as C
from streamlens.ablation.engine import Added, Engine, Intervention
from streamlens.ablation.swap import Swap
from streamlens.data import window_batch
from streamlens.sites import Site
from test_ablation import reference_per_text


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(7)
    return window_batch(torch.randint(3, 64, (5, 8), generator=generator))


def test_passes_visit_every_spec_and_chunk_once(tiny, windows):
    specs = [A.Ablation((site,), "mean", "total") for site in A.units(tiny, "head")] + [Swap(0), Swap(1)]
    engine = Engine(tiny, windows, ("loss_increase",), seed=0, batch_size=4)  # chunks of 4 and 1 texts
    seen = torch.zeros(len(specs), windows.n_texts, dtype=torch.long)
    for group, clean, rows in engine.passes(specs):
        assert clean.rows == rows and clean.n_texts == rows.stop - rows.start
        assert len(group) <= engine.variants_per_forward
        seen[group, rows] += 1
    assert (seen == 1).all()
    assert isinstance(Swap(0), Intervention) and not isinstance(specs[0], Intervention)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_added_unit_equals_the_whole_ablation_and_a_hooked_forward(tiny, windows, method):
    """Restarting at the added unit from the base's stream gives the numbers of restarting at the
    base's first layer, bit for bit, and those of full hooked forwards text by text."""
    n = tiny.n_layers
    base = A.Ablation((Site("mlp", 0), Site("head", n - 1, 1)), method, "total")
    units = [Site("attn", 0), Site("head", 1, 2), Site("mlp", 1), Site("block", 1), Site("mlp", n - 1), Site("head", n - 1, 0)]
    added = [Added(base, unit) for unit in units]
    whole = [spec.full for spec in added]
    engine = Engine(tiny, windows, ("loss_increase", "kl", "top1_agreement"), seed=3, batch_size=6)
    fast, plain = engine.per_text(added), engine.per_text(whole)
    assert torch.equal(fast, plain)
    for index, spec in enumerate(whole):
        torch.testing.assert_close(fast[index], reference_per_text(tiny, windows, spec, seed=3), rtol=0, atol=1e-9)


def test_greedy_restarts_from_the_removed_units_and_keeps_the_numbers(tiny, windows):
    order = A.units(tiny, "attn") + A.units(tiny, "mlp")
    greedy = A.cumulative(tiny, windows, order, "greedy", "mean", n_boot=50, batch_size=6)
    for step in range(len(order)):  # each step: the whole set, evaluated the plain way
        spec = A.Ablation(greedy.sites[: step + 1], "mean", "total")
        plain = A.evaluate(tiny, windows, [spec], n_boot=50, batch_size=6)
        assert torch.equal(greedy.per_text[step], plain.per_text[0])
    torch.testing.assert_close(greedy.per_text[-1], reference_per_text(tiny, windows, A.Ablation(tuple(order), "mean")),
                               rtol=0, atol=1e-9)


def test_swaps_on_a_checkpointed_backend_equal_the_plain_run(tiny, windows, tmp_path):
    specs = [Swap(layer) for layer in range(tiny.n_layers - 1)] + [A.Ablation((Site("block", 1),))]
    plain = A.evaluate(tiny, windows, specs, batch_size=2, n_boot=50)
    backend = C.choose_backend(tiny, windows, checkpoint_folder=tmp_path / "ck", identity={"what": "swaps"})
    assert isinstance(backend, B.LocalBackend) and backend.checkpoint is not None
    checkpointed = A.evaluate(tiny, windows, specs, batch_size=2, n_boot=50, backend=backend)
    assert torch.equal(checkpointed.per_text, plain.per_text) and checkpointed.methods[0] == "swap"
    assert len(list((tmp_path / "ck").rglob("*.safetensors"))) > 0
    again = A.evaluate(tiny, windows, specs, batch_size=2, n_boot=50, backend=backend)  # all shards found
    assert torch.equal(again.per_text, plain.per_text)


def test_backend_choice_lives_in_the_library(tiny, windows, tmp_path):
    assert C.choose_backend(tiny, windows) is None  # nothing asked: a plain run
    assert C.choose_batch_size(tiny, windows, "cpu") == C.DEFAULT_BATCH_SIZE
    folder = tmp_path / "ck"
    backend = C.choose_backend(tiny, windows, checkpoint_folder=folder, identity={"batch_size": 3})
    A.sweep(tiny, windows, "mlp", backend=backend, batch_size=3, n_boot=40)
    assert C.stored_batch_size(folder) == 3 and C.choose_batch_size(tiny, windows, "cpu", checkpoint_folder=folder) == 3
    with pytest.raises(ValueError, match="--workers 0 must be at least 1"):
        C.choose_backend(tiny, windows, workers=0)
    with pytest.raises(ValueError, match="is not auto or HOST:PORT"):
        C.check_backend_options(ray_address="here")
    with pytest.raises(ValueError, match="--device 'mps' with Ray workers"):
        C.check_backend_options(workers=2, device="mps")


def test_sweep_takes_progress_command_and_backend_as_keywords(tiny, windows):
    counted = []
    result = A.sweep(tiny, windows, "attn", "zero", "total", progress=counted.append, command="made here",
                     backend=B.LocalBackend(), n_boot=40)
    assert sum(counted) == tiny.n_layers and result.provenance.command == "made here"
    with pytest.raises(TypeError, match="unknown evaluation option 'progres'"):
        A.sweep(tiny, windows, "attn", progres=counted.append)
