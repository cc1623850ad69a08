"""Property tests: the identities and the ablation invariants over random tiny configs (hypothesis).

Each example draws an architecture (Llama-like RMSNorm/rotary or GPT-2-like LayerNorm/biases), a
number of layers, heads, a head width, a dtype (float64, float32) and a seed, then builds that model
and checks one property. Examples are few and derandomised so CI stays fast and reproducible; set
STREAMLENS_HYPOTHESIS_EXAMPLES for a longer hunt (models are cached per config within the module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from streamlens import ablation as A  # noqa: E402
from streamlens import sites  # noqa: E402
from streamlens.data import window_batch  # noqa: E402
from streamlens.decomposition import decompose  # noqa: E402
from streamlens.model import load_model  # noqa: E402
from streamlens.recording import record  # noqa: E402
from streamlens.testing import TINY_VOCAB, tiny_model_folder  # noqa: E402

EXAMPLES = int(os.environ.get("STREAMLENS_HYPOTHESIS_EXAMPLES", "5"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(hypothesis.HealthCheck))
TOLERANCE = {"float64": 1e-9, "float32": 2e-4}  # relative to the size of what is compared


@dataclass(frozen=True)
class Config:
    arch: str
    n_layers: int
    n_heads: int
    d_head: int
    dtype: str
    seed: int


configs = st.builds(Config, arch=st.sampled_from(["llama", "gpt2"]), n_layers=st.integers(1, 3),
                    n_heads=st.sampled_from([1, 2, 4]), d_head=st.sampled_from([4, 8]),
                    dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 1))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Config -> loaded model and a few token rows; each config is built once per module."""
    made: dict[Config, tuple] = {}

    def get(config: Config):
        if config not in made:
            name = f"{config.arch}-{config.n_layers}-{config.n_heads}-{config.d_head}-{config.seed}"
            folder = tmp_path_factory.mktemp(name)
            tiny_model_folder(folder, arch=config.arch, n_layers=config.n_layers, n_heads=config.n_heads,
                              d_model=config.n_heads * config.d_head, seed=config.seed)
            model = load_model(str(folder), dtype=config.dtype)
            generator = torch.Generator().manual_seed(config.seed)
            made[config] = (model, torch.randint(3, TINY_VOCAB, (3, 7), generator=generator))
        return made[config]

    return get


def _close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= TOLERANCE[dtype] * scale


@PROPERTY
@given(config=configs)
def test_writes_sum_to_the_final_stream_and_give_the_logits(build, config):
    model, tokens = build(config)
    writes = record(model, tokens, heads=True)
    positional = 0 if writes.pos_embed is None else writes.pos_embed  # rotary models have none
    rebuilt = writes.embed + positional + writes.attn.sum(0) + writes.mlp.sum(0)
    assert _close(rebuilt, writes.final, config.dtype)
    assert _close(writes.heads.sum(3) + writes.attn_bias[:, None, None, :], writes.attn, config.dtype)
    assert _close(model.final_logits(writes.final), writes.logits, config.dtype)


@PROPERTY
@given(config=configs, by_head=st.booleans(), position=st.integers(-7, 6))
def test_contributions_sum_to_the_real_logit(build, config, by_head, position):
    model, tokens = build(config)
    parts = decompose(model, tokens[:1], positions=position, top_k=2, by_head=by_head)
    real = model.run(tokens[:1])[0, position].gather(-1, parts.target_ids[0]).to(parts.total.dtype)
    assert _close(parts.total[0], real, config.dtype) and _close(parts.logits[0], real, config.dtype)


@PROPERTY
@given(config=configs, effect=st.sampled_from(A.EFFECTS), method=st.sampled_from(A.METHODS))
def test_ablating_nothing_changes_nothing(build, config, effect, method):
    model, tokens = build(config)
    batch = window_batch(tokens)
    result = A.evaluate(model, batch, [A.Ablation((), method, effect)], n_boot=40)
    assert result.per_text[0, 0].abs().max() <= TOLERANCE[config.dtype]  # loss increase
    assert result.per_text[0, 1].abs().max() <= TOLERANCE[config.dtype]  # KL
    with A.ablated(model, A.Ablation((), method, effect), reference=batch):
        assert torch.equal(model.run(tokens), model.run(tokens))
    assert not model.has_hooks()


@PROPERTY
@given(config=configs, effect=st.sampled_from(A.EFFECTS))
def test_zero_ablating_every_block_leaves_the_embedding(build, config, effect):
    model, tokens = build(config)
    kept = {}
    model.run(tokens, hooks=[(sites.resid_pre(0), lambda t, hook: kept.__setitem__("e", t.clone()))])
    expected = model.final_logits(kept["e"])
    with A.ablated(model, A.Ablation(tuple(A.units(model, "block")), "zero", effect)):
        assert _close(model.run(tokens), expected, config.dtype)
    assert not model.has_hooks()


@PROPERTY
@given(config=configs, data=st.data())
def test_zero_ablating_one_head_removes_exactly_its_write(build, config, data):
    model, tokens = build(config)
    layer = data.draw(st.integers(0, config.n_layers - 1))
    head = data.draw(st.integers(0, config.n_heads - 1))
    clean = record(model, tokens, heads=True)
    with A.ablated(model, A.Ablation((sites.Site("head", layer, head),), "zero", "total")):
        ablated = record(model, tokens, heads=True)
    assert _close(clean.attn[layer] - ablated.attn[layer], clean.heads[layer, :, :, head], config.dtype)
