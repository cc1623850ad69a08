"""The ablation engine against a deliberately simple reference, plus its invariants.

The reference below shares no code with the engine: every text runs alone (no batching, padding,
restart or caching), a full forward with hooks replaces the write (attention and MLP writes through
the model's hook points, heads through a plain PyTorch pre-hook on the output projection), and the
metrics come from full logits with torch's own cross_entropy / kl_div.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from streamlens import ablation as A
from streamlens import sites
from streamlens.data import prompt_batch, window_batch
from streamlens.metrics import TEXT_METRICS
from streamlens.results import AblationResult, CumulativeAblation
from streamlens.sites import Site

TOL = 1e-9


# ----- the reference ----------------------------------------------------------------------------
def _o_proj(model, layer):
    return model._bridge.blocks[layer].attn.o  # input: z of all heads, flattened [batch, pos, heads*d_head]


def _head_slice(model, head):
    d_head = model.info.d_head
    return slice(head * d_head, (head + 1) * d_head)


@contextlib.contextmanager
def _o_inputs(model, layers, edit=None):
    """Pre-hooks on the output projections: record their first input, optionally edit it."""
    seen, handles = {}, []

    def make(layer):
        def pre_hook(module, args):
            seen.setdefault(layer, args[0].clone())
            if edit is not None:
                return (edit(layer, args[0].clone()),)
            return None

        return pre_hook

    try:
        for layer in layers:
            handles.append(_o_proj(model, layer).register_forward_pre_hook(make(layer)))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _split_writes(spec):
    out = []
    for site in spec.sites:
        out += [Site("attn", site.layer), Site("mlp", site.layer)] if site.kind == "block" else [site]
    return out


def _clean_writes(model, tokens, writes):
    """One text [1, pos] -> {write: [pos, d_model] or head z [pos, d_head]}."""
    kept = {}
    hooks = []
    for w in writes:
        if w.kind in ("attn", "mlp"):
            name = sites.attn_out(w.layer) if w.kind == "attn" else sites.mlp_out(w.layer)
            hooks.append((name, lambda t, hook, w=w: kept.__setitem__(w, t[0].clone())))
    with _o_inputs(model, {w.layer for w in writes if w.kind == "head"}) as seen:
        model.run(tokens, hooks=hooks)
    for w in writes:
        if w.kind == "head":
            kept[w] = seen[w.layer][0, :, _head_slice(model, w.head)]
    return kept


def _reference_replacements(model, texts, spec, seed):
    """{text index: {write: replacement [pos_i, ...]}} computed text by text."""
    writes = _split_writes(spec)
    clean = [_clean_writes(model, tokens, writes) for tokens in texts]
    out = {}
    for i, tokens in enumerate(texts):
        length = tokens.shape[1]
        reps = {}
        for w in writes:
            if spec.method == "zero":
                reps[w] = torch.zeros_like(clean[i][w])
            elif spec.method == "mean":
                reps[w] = torch.cat([c[w] for c in clean]).mean(0).expand_as(clean[i][w])
            else:
                donor = int(A.donor_rows(len(texts), seed)[i])
                donor_write = clean[donor][w]
                reps[w] = torch.stack([donor_write[min(p, donor_write.shape[0] - 1)] for p in range(length)])
        out[i] = (reps, clean[i])
    return out


def _reference_logits(model, tokens, spec, reps, clean):
    """Full forward of one text [1, pos] with the ablation applied -> logits [pos, vocab]."""
    heads = [w for w in reps if w.kind == "head"]
    if spec.effect == "total":
        hooks = []
        for w, r in reps.items():
            if w.kind in ("attn", "mlp"):
                name = sites.attn_out(w.layer) if w.kind == "attn" else sites.mlp_out(w.layer)
                hooks.append((name, lambda t, hook, r=r: r.unsqueeze(0).clone()))

        def edit(layer, z):
            for w in heads:
                if w.layer == layer:
                    z[0, :, _head_slice(model, w.head)] = reps[w]
            return z

        with _o_inputs(model, {w.layer for w in heads}, edit):
            return model.run(tokens, hooks=hooks)[0]

    def head_write(w, z_head):  # the projection of this head alone (the bias cancels)
        o = _o_proj(model, w.layer)
        only = torch.zeros(1, z_head.shape[0], model.n_heads * model.info.d_head, dtype=z_head.dtype)
        only[0, :, _head_slice(model, w.head)] = z_head
        return (o(only) - o(torch.zeros_like(only)))[0]

    def patch(stream, hook):
        for w, r in reps.items():
            write, new = (head_write(w, clean[w]), head_write(w, r)) if w.kind == "head" else (clean[w], r)
            stream = stream - write.unsqueeze(0) + new.unsqueeze(0)
        return stream

    return model.run(tokens, hooks=[(sites.FINAL_STREAM, patch)])[0]


def reference_per_text(model, batch, spec, seed=0):
    """[metric, text] for TEXT_METRICS (+ target metrics for prompt sets), text by text."""
    texts = [batch.tokens[i : i + 1, : int(batch.valid[i].sum())] for i in range(batch.n_texts)]
    replacements = _reference_replacements(model, texts, spec, seed) if spec.sites else {}
    columns = []
    for i, tokens in enumerate(texts):
        clean_logits = model.run(tokens)[0]
        reps, clean = replacements.get(i, ({}, {}))
        logits = _reference_logits(model, tokens, spec, reps, clean) if spec.sites else clean_logits
        scored = batch.scored[i, : tokens.shape[1]]
        labels = batch.labels[i, : tokens.shape[1]][scored]
        p, q = clean_logits[scored].double(), logits[scored].double()  # float32 models: exact metric maths
        values = [
            (F.cross_entropy(q, labels, reduction="none") - F.cross_entropy(p, labels, reduction="none")).mean(),
            F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean(),
            (q.argmax(-1) == p.argmax(-1)).double().mean(),
        ]
        if batch.targets is not None:
            t = batch.targets[i]
            values += [(q[:, t] - p[:, t]).mean(), (q.softmax(-1)[:, t] - p.softmax(-1)[:, t]).mean()]
        columns.append(torch.stack(values))
    return torch.stack(columns, dim=1)


# ----- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(3)
    return window_batch(torch.randint(3, 64, (5, 8), generator=generator))


def _some_units(model, kind):
    if kind == "head":
        return [Site("head", 0, 1), Site("head", 1, 0), Site("head", model.n_layers - 1, model.n_heads - 1)]
    return A.units(model, kind)


# ----- engine == reference ----------------------------------------------------------------------
@pytest.mark.parametrize("effect", A.EFFECTS)
@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("kind", A.UNIT_KINDS)
def test_single_units_match_reference(tiny, windows, kind, method, effect):
    specs = [A.Ablation((site,), method, effect) for site in _some_units(tiny, kind)]
    # batch_size 3 < 5 texts: chunks of texts (means and donors must still span all texts)
    result = A.evaluate(tiny, windows, specs, seed=4, batch_size=3, n_boot=50)
    assert result.metrics == TEXT_METRICS
    for index, spec in enumerate(specs):
        expected = reference_per_text(tiny, windows, spec, seed=4)
        assert (result.per_text[index] - expected).abs().max() < TOL, spec.label


@pytest.mark.parametrize("effect", A.EFFECTS)
@pytest.mark.parametrize("method", A.METHODS)
def test_sets_of_units_match_reference_with_variants_batched(tiny, windows, method, effect):
    last = tiny.n_layers - 1
    specs = [
        A.Ablation((Site("attn", 0), Site("head", last, 2), Site("mlp", 1)), method, effect),
        A.Ablation((Site("block", 1), Site("head", last, 0)), method, effect),
        A.Ablation((Site("block", 1), Site("mlp", last)), method, effect),  # same restart: one forward
        A.Ablation((Site("head", 1, 1), Site("head", 1, 3), Site("block", last)), method, effect),
    ]
    result = A.evaluate(tiny, windows, specs, seed=1, batch_size=20, n_boot=50)  # up to 4 variants a forward
    for index, spec in enumerate(specs):
        assert (result.per_text[index] - reference_per_text(tiny, windows, spec, seed=1)).abs().max() < TOL


@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("effect", A.EFFECTS)
def test_prompt_sets_with_padding_match_reference(tiny, method, effect):
    """Prompts of unequal length are right-padded in one batch; the reference runs each alone."""
    prompts = [("w5 w6 w7 w8", "w9"), ("w10 w11", "w12"), ("w20 w21 w22 w23 w24 w25", "w26"), ("w30", "w31")]
    batch = prompt_batch(tiny, prompts)
    assert not batch.valid.all()
    specs = [A.Ablation((site,), method, effect) for site in (Site("block", 0), Site("attn", 1), Site("head", 2, 1))]
    result = A.evaluate(tiny, batch, specs, seed=2, n_boot=50)
    assert result.metrics[-2:] == ("target_logit_change", "target_prob_change")
    for index, spec in enumerate(specs):
        assert (result.per_text[index] - reference_per_text(tiny, batch, spec, seed=2)).abs().max() < TOL


@pytest.mark.parametrize("effect", A.EFFECTS)
@pytest.mark.parametrize("method", A.METHODS)
def test_context_manager_matches_reference_logits(tiny, windows, method, effect):
    spec = A.Ablation((Site("attn", 0), Site("head", 2, 3), Site("mlp", 1)), method, effect)
    with A.ablated(tiny, spec, reference=windows, seed=5):
        logits = tiny.run(windows.tokens)
    assert not tiny.has_hooks()
    texts = [windows.tokens[i : i + 1] for i in range(windows.n_texts)]
    for i, (reps, clean) in _reference_replacements(tiny, texts, spec, seed=5).items():
        assert (logits[i] - _reference_logits(tiny, texts[i], spec, reps, clean)).abs().max() < TOL


# ----- invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("effect", A.EFFECTS)
def test_ablating_nothing_changes_nothing(tiny, windows, effect):
    result = A.evaluate(tiny, windows, [A.Ablation((), "zero", effect)], n_boot=50)
    assert result.per_text[0, 0].eq(0).all() and result.per_text[0, 1].eq(0).all()
    assert result.per_text[0, 2].eq(1).all()
    with A.ablated(tiny, A.Ablation(effect=effect)):
        assert torch.equal(tiny.run(windows.tokens), tiny.run(windows.tokens))


def test_model_restored_after_exception(tiny, windows):
    clean = tiny.run(windows.tokens)
    for spec in (A.Ablation((Site("block", 1),)), A.Ablation((Site("head", 0, 2),), "mean", "direct")):
        with pytest.raises(RuntimeError, match="inside"):
            with A.ablated(tiny, spec, reference=windows):
                assert tiny.has_hooks()
                assert not torch.equal(tiny.run(windows.tokens), clean)
                raise RuntimeError("failure inside the block")
        assert not tiny.has_hooks()
        assert torch.equal(tiny.run(windows.tokens), clean)


@pytest.mark.parametrize("effect", A.EFFECTS)
def test_zero_ablating_every_block_leaves_the_embedding(tiny, windows, effect):
    """final_logits(embedding) = unembed(final norm(embed + pos_embed)): no block write survives."""
    kept = {}
    tiny.run(windows.tokens, hooks=[(sites.resid_pre(0), lambda t, hook: kept.__setitem__("e", t.clone()))])
    expected = tiny.final_logits(kept["e"])
    spec = A.Ablation(tuple(A.units(tiny, "block")), "zero", effect)
    with A.ablated(tiny, spec):
        assert (tiny.run(windows.tokens) - expected).abs().max() < TOL
    result = A.evaluate(tiny, windows, [spec], n_boot=50)
    clean = tiny.run(windows.tokens)
    scored = windows.scored
    p, q, labels = clean[scored], expected[scored], windows.labels[scored]
    loss = (F.cross_entropy(q, labels, reduction="none") - F.cross_entropy(p, labels, reduction="none"))
    assert abs(float(result.values[0, 0]) - float(loss.reshape(windows.n_texts, -1).mean(-1).mean())) < TOL


def test_zero_head_removes_exactly_its_W_O_write(tiny, windows):
    """Zeroing head h's z changes that layer's attention write by exactly -z_h @ W_O[h] (b_O stays)."""
    layer, head = 1, 2
    kept = {}
    tiny.run(windows.tokens, hooks=[(sites.attn_z(layer), lambda t, hook: kept.__setitem__("z", t.clone())),
                                    (sites.attn_out(layer), lambda t, hook: kept.__setitem__("clean", t.clone()))])
    with A.ablated(tiny, A.Ablation((Site("head", layer, head),))):
        tiny.run(windows.tokens, hooks=[(sites.attn_out(layer), lambda t, hook: kept.__setitem__("ablated", t.clone()))])
    expected = kept["clean"] - kept["z"][:, :, head] @ tiny.W_O(layer)[head]
    assert (kept["ablated"] - expected).abs().max() < TOL


def test_final_norm_matches_final_logits_and_clean_logits(tiny, windows):
    kept = {}
    logits = tiny.run(windows.tokens, hooks=[(sites.FINAL_STREAM, lambda t, hook: kept.__setitem__("f", t.clone()))])
    assert (tiny.final_norm(kept["f"]) @ tiny.W_U + tiny.b_U - logits).abs().max() < 1e-12
    assert (tiny.final_logits(kept["f"]) - logits).abs().max() < 1e-12


def test_cumulative_order_and_greedy(tiny, windows):
    order = [Site("mlp", 2), Site("attn", 0), Site("block", 1)]
    ordered = A.cumulative(tiny, windows, order, mode="order", n_boot=50)
    for step in range(len(order)):
        expected = reference_per_text(tiny, windows, A.Ablation(tuple(order[: step + 1])))
        assert (ordered.per_text[step] - expected).abs().max() < TOL
    assert ordered.units == ("mlp 2", "attn 0", "block 1")
    greedy = A.cumulative(tiny, windows, A.units(tiny, "attn"), mode="greedy", n_boot=50)
    singles = A.sweep(tiny, windows, "attn", n_boot=50)
    assert greedy.units[0] == singles.units[int(singles.values[:, 0].argmin())]  # least damaging first
    assert sorted(greedy.units) == sorted(singles.units)
    assert (greedy.per_text[-1] - reference_per_text(tiny, windows, A.Ablation(tuple(A.units(tiny, "attn"))))
            ).abs().max() < TOL


def test_cumulative_steps_and_budget_cut_the_full_run(tiny, windows):
    """`steps` keeps the first steps of the full run (greedy never looks ahead); `budget` keeps up to
    and including the first step whose mean damage passes it; a bad `steps` is refused by name."""
    units = A.units(tiny, "attn") + A.units(tiny, "mlp")
    for mode in ("order", "greedy"):
        full = A.cumulative(tiny, windows, units, mode=mode, n_boot=40)
        counted = []  # the progress bar's total is what the run evaluates, per chunk of texts
        cut = A.cumulative(tiny, windows, units, mode=mode, n_boot=40, steps=3, progress=counted.append)
        assert cut.units == full.units[:3] and torch.equal(cut.per_text, full.per_text[:3])
        chunks = -(-windows.n_texts // A.EvalOptions().batch_size)
        assert sum(counted) == A.cumulative_evaluations(len(units), mode, steps=3) * chunks
        means = full.per_text[:, 0].mean(-1)  # loss increase after each step
        budget = float(means[1]) - 1e-12  # step 1 passes it (or step 0 already does): cut there
        over = int((means > budget).nonzero()[0])
        assert A.cumulative(tiny, windows, units, mode=mode, n_boot=40, budget=budget).units == full.units[: over + 1]
    for bad in (0, len(units) + 1, 1.5, True):
        with pytest.raises(ValueError, match=f"steps {bad!r} must be a whole number"):
            A.cumulative(tiny, windows, units, steps=bad)


def test_result_round_trip_and_tidy_frame(tiny, windows, tmp_path):
    result = A.sweep(tiny, windows, "head", method="resample", layers=[1], heads=[0, 3], n_boot=50, command="test")
    assert result.units == ("L1H0", "L1H3") and result.heads == (0, 3) and result.layers == (1, 1)
    loaded = AblationResult.load(result.save(tmp_path / "r.safetensors"))
    assert torch.equal(loaded.values, result.values) and loaded.units == result.units
    frame = result.to_dataframe()
    assert {"unit", "layer", "head", "method", "metric", "value", "ci_low", "ci_high"} <= set(frame.columns)
    assert len(frame) == 2 * len(TEXT_METRICS)
    cumulative = A.cumulative(tiny, windows, [Site("attn", 0), Site("mlp", 0)], n_boot=40)
    assert CumulativeAblation.load(cumulative.save(tmp_path / "c.safetensors")).units == ("attn 0", "mlp 0")
    assert list(cumulative.to_dataframe()["n_removed"].unique()) == [1, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: A.Ablation((Site("block", 0),), method="shuffle"), "unknown method 'shuffle': choose from zero"),
        (lambda m: A.Ablation((Site("block", 0),), effect="indirect"), "unknown effect 'indirect'"),
        (lambda m: A.Ablation((Site("embed"),)), "cannot ablate 'embed'"),
        (lambda m: A.Ablation((Site("block", 1), Site("mlp", 1))), "ablation units overlap: mlp 1"),
        (lambda m: A.Ablation((Site("attn", 1), Site("head", 1, 2))), "overlap"),
        (lambda m: A.Ablation((Site("block", 3),)).check(m), "layer 3 out of range: model has 3 layers"),
        (lambda m: A.Ablation((Site("head", 0, 7),)).check(m), "head 7 out of range"),
        (lambda m: A.units(m, "neuron"), "unknown unit 'neuron': choose from block, attn, mlp, head"),
        (lambda m: A.units(m, "block", heads=[0]), "heads apply only to unit 'head'"),
        (lambda m: A.donor_rows(1), "resample ablation needs at least 2 texts"),
        (lambda m: A.cumulative(m, None, [Site("attn", 0)], mode="random"), "unknown cumulative mode 'random'"),
    ],
)
def test_bad_specs_name_the_value(tiny, make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make(tiny)


def test_resample_donors_are_a_seeded_derangement():
    donors = A.donor_rows(7, seed=3)
    assert sorted(donors.tolist()) == list(range(7)) and (donors != torch.arange(7)).all()
    assert torch.equal(donors, A.donor_rows(7, seed=3)) and not torch.equal(donors, A.donor_rows(7, seed=4))


@pytest.mark.real
def test_smollm2_fast_engine_matches_full_hooked_forwards(smol):
    """Real model, float32: restart + block skip + chunked unembedding vs one hooked forward each."""
    from streamlens.data import load_texts, token_windows

    batch = window_batch(token_windows(smol, load_texts(None), window=12, max_windows=3))
    layers = [0, 14, smol.n_layers - 1]
    result = A.sweep(smol, batch, "block", layers=layers, n_boot=40)
    for index, layer in enumerate(layers):
        expected = reference_per_text(smol, batch, A.Ablation((Site("block", layer),)))
        # float32: the two paths sum in different orders; metrics of ~9 nats agree to ~2e-5 relative
        torch.testing.assert_close(result.per_text[index], expected.to(result.per_text.dtype), rtol=1e-4, atol=1e-5)


def test_figures_follow_the_result_for_any_number_of_units(tiny, windows):
    from streamlens.plots import ablation as plots

    total = A.sweep(tiny, windows, "head", n_boot=50)  # 3 layers x 4 heads
    direct = A.sweep(tiny, windows, "head", effect="direct", n_boot=50)
    figure = plots.damage(total, "kl")
    trace = figure.data[0]
    assert list(trace.x) == list(total.units) and len(trace.x) == tiny.n_layers * tiny.n_heads
    assert min(trace.error_y.array) >= 0 and min(trace.error_y.arrayminus) >= 0
    paired = plots.direct_vs_total(direct, total)
    assert [t.name for t in paired.data] == ["direct effect", "total effect"]
    with pytest.raises(ValueError, match="same units"):
        plots.direct_vs_total(A.sweep(tiny, windows, "attn", effect="direct", n_boot=40), total)
    with pytest.raises(ValueError, match="metric 'target_prob_change' not in this result"):
        plots.damage(total, "target_prob_change")
    curve = plots.cumulative_curve(A.cumulative(tiny, windows, A.units(tiny, "mlp"), n_boot=40))
    assert list(curve.data[1].x) == [1, 2, 3]
