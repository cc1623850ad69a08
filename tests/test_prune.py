"""streamlens prune: the export computes exactly the removal the engine simulated (every family, float64),
GGUF exports load back, the strategies choose what their definitions say (checked against plain HF
hidden states), held-out losses equal the exported model's own loss, and bad input writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from streamlens import ablation as A
from streamlens import data as D
from streamlens.model import load_model
from streamlens.model import export as E
from streamlens.model.gguf import GGUFVocabulary, write_gguf
from streamlens.prune import PruneConfig, choose, compare, run
from streamlens.prune.prove import export, prove, relative, simulated_logits
from streamlens.sites import Site
from streamlens.testing import FAMILIES, TINY_VOCAB, tiny_hf_model, tiny_model_folder

N_LAYERS = 4
REMOVED = (0, 2)  # keeps 1 and 3: Gemma 3's alternating layer_types become [full, full], not [sliding, full]


def _tokens(n: int = 3, pos: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_computes_the_simulated_removal(family, tmp_path):
    """Loaded fresh with transformers and with load_model, the exported folder's logits are the engine's
    zero-removal of the same blocks (float64, 1e-10 of the logit scale) and not the full model's."""
    model = load_model(str(tiny_model_folder(tmp_path / "src", family, n_layers=N_LAYERS)), dtype="float64")
    folder = export(model, REMOVED, tmp_path / "pruned")
    tokens = _tokens()
    check = prove(model, folder, REMOVED, tokens)
    assert check.n_layers_after == N_LAYERS - len(REMOVED)
    assert check.hf <= 1e-10 and check.streamlens <= 1e-10 and check.passed, check
    with torch.inference_mode():
        full = model.run(tokens)
    assert relative(full, simulated_logits(model, REMOVED, tokens)) > 1e-3  # the removal changes the logits
    facts = json.loads((folder / "streamlens-export.json").read_text())
    assert facts["removed_blocks"] == list(REMOVED) and facts["n_layers_after"] == 2


def test_per_layer_lists_are_pruned_in_step_and_the_source_is_untouched():
    hf = tiny_hf_model("gemma3_text", n_layers=N_LAYERS)
    before = {name: tensor.clone() for name, tensor in hf.state_dict().items()}
    pruned = E.drop_blocks(hf, REMOVED)
    assert pruned.config.layer_types == [hf.config.layer_types[1], hf.config.layer_types[3]] == ["full_attention"] * 2
    assert pruned.config.num_hidden_layers == 2 and hf.config.num_hidden_layers == N_LAYERS
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight, hf.model.layers[3].mlp.up_proj.weight)
    assert all(torch.equal(before[name], tensor) for name, tensor in hf.state_dict().items())


def test_lists_that_are_not_per_layer_stay_whole():
    hf = tiny_hf_model("llama", n_layers=2, eos_token_id=[1, 2])  # two ids, two layers: not a per-layer list
    assert E.drop_blocks(hf, (0,)).config.eos_token_id == [1, 2]


@pytest.mark.parametrize(("blocks", "message"), [
    ((0, 1, 2, 3), "cannot remove 4 of 4 blocks"),
    ((4,), "block 4 out of range"),
    ((1, 1), "name a block twice"),
])
def test_drop_blocks_refuses_bad_removals(blocks, message):
    with pytest.raises(ValueError, match=message):
        E.drop_blocks(tiny_hf_model("llama", n_layers=N_LAYERS), blocks)


def test_configs_that_cannot_express_the_removal_are_refused():
    with pytest.raises(E.ExportRefused, match="scale_attn_by_inverse_layer_idx"):
        E.drop_blocks(tiny_hf_model("gpt2", n_layers=N_LAYERS, scale_attn_by_inverse_layer_idx=True), (1,))
    hf = tiny_hf_model("qwen3", n_layers=N_LAYERS)
    hf.config.mlp_only_layers = [2]
    with pytest.raises(E.ExportRefused, match="mlp_only_layers"):
        E.drop_blocks(hf, (1,))


def test_save_refuses_a_used_folder_and_an_interrupt_leaves_nothing(tmp_path, monkeypatch):
    hf = tiny_hf_model("llama", n_layers=N_LAYERS)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        E.save_folder(hf, None, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]

    class Tokenizer:
        def save_pretrained(self, folder):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        E.save_folder(hf, Tokenizer(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no folder, no temporary folder
    (tmp_path / "empty").mkdir()
    saved = E.save_folder(hf, None, tmp_path / "empty")  # an empty folder is fine
    from streamlens.files import umask

    assert {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}["model.safetensors"] == 0o666 & ~umask()


def _vocabulary() -> GGUFVocabulary:
    tokens = ("<unk>", "<bos>", "<eos>") + tuple(chr(ord("a") + i % 26) * (1 + i // 26) for i in range(TINY_VOCAB - 3))
    return GGUFVocabulary(tokens, (3, 3, 3) + (1,) * (TINY_VOCAB - 3), (), 1, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_gguf_export_loads_back_as_the_simulated_removal(family, tmp_path):
    """The pruned model written as GGUF (Llama: with llama.cpp's q/k permutation; tied qwen2 and gpt2 without
    an output matrix) and read by transformers' GGUF reader computes the simulated removal to float32 rounding."""
    overrides = {"gpt2": {"n_positions": 1024}}.get(family, {})
    model = load_model(str(tiny_model_folder(tmp_path / "src", family, n_layers=N_LAYERS, **overrides)))
    hf, _ = E.load_hf(model.info.source)
    path = write_gguf(E.drop_blocks(hf, REMOVED), tmp_path / "pruned.gguf", _vocabulary())
    tokens = _tokens()
    assert relative(E.folder_logits(path, tokens), simulated_logits(model, REMOVED, tokens)) <= 1e-5
    import gguf

    names = [tensor.name for tensor in gguf.GGUFReader(path).tensors]  # a tied model stores its matrix once
    assert ("output.weight" in names) == (not hf.config.tie_word_embeddings) and len(names) == len(set(names))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("qwen"), "qwen2", n_layers=6)
    return load_model(str(folder), dtype="float64")


def _batches():
    generator = torch.Generator().manual_seed(0)
    choice = D.window_batch(torch.randint(3, TINY_VOCAB, (6, 12), generator=generator), description="choice")
    held_out = D.window_batch(torch.randint(3, TINY_VOCAB, (8, 12), generator=generator), description="held out")
    return choice, held_out


def test_strategies_choose_what_their_definitions_say(qwen):
    """BI and angular distance recomputed from HF's own hidden states; greedy's first step is the
    single-block sweep's cheapest block; last = the blocks before the final one."""
    choice_batch, _ = _batches()
    choice = choose(qwen, choice_batch, 3, A.EvalOptions(n_boot=40))
    hf, _ = E.load_hf(qwen.info.source, "float64")
    from streamlens.model.fidelity import exact_float64_norms, float64_softmax

    exact_float64_norms(hf)
    with torch.inference_mode(), float64_softmax():
        states = hf(choice_batch.tokens, output_hidden_states=True).hidden_states  # embeddings, after each block
    inputs = torch.stack(list(states[:6]))  # x_0 .. x_5, the stream entering each block (HF's last state is normed)
    outputs = torch.cat([inputs[1:], _final_stream(qwen, choice_batch.tokens)[None]])
    bi = (1 - F.cosine_similarity(inputs, outputs, dim=-1)).mean(-1)  # [layer, text]
    assert choice.removed("block_influence", 2) == tuple(sorted(torch.argsort(bi.mean(-1))[:2].tolist()))
    sweep = A.sweep(qwen, choice_batch, "block", metrics=("loss_increase",), n_boot=40)
    assert choice.removed("greedy", 1) == (int(torch.argmin(sweep.values[:, 0])),)
    assert abs(float(choice.greedy_damage[0]) - float(sweep.values[:, 0].min())) <= 1e-12
    assert choice.removed("last", 2) == (3, 4) and choice.removed("last", 3) == (2, 3, 4)
    span = choice.removed("angular", 3)
    distance = [float(torch.arccos(F.cosine_similarity(torch.cat([inputs, outputs[-1:]])[s],
                                                        torch.cat([inputs, outputs[-1:]])[s + 3], dim=-1)
                                   .clamp(-1, 1)).mean()) for s in range(4)]
    assert span == tuple(range(distance.index(min(distance)), distance.index(min(distance)) + 3))


def test_greedy_equals_a_plain_loop_of_full_removals_cut_at_k(qwen):
    """greedy_blocks (the engine's greedy removal, each candidate restarted from the removed blocks' stream)
    chooses what a plain loop of full forwards chooses (same order, same damage), its k steps are the
    first k of the full greedy run, and a budget cuts after the first step whose damage passes it."""
    from streamlens.prune.choose import greedy_blocks

    batch, _ = _batches()
    options = A.EvalOptions(metrics=("loss_increase",), n_boot=40)
    removed, damage, remaining = [], [], [Site("block", layer) for layer in range(qwen.n_layers)]
    for _ in range(4):  # the reference: every candidate evaluated as a whole removal from the clean model
        result = A.evaluate(qwen, batch, [A.Ablation((*removed, site)) for site in remaining], options)
        best = int(torch.argmin(result.values[:, 0]))
        removed.append(remaining.pop(best))
        damage.append(float(result.values[best, 0]))
    order, measured = greedy_blocks(qwen, batch, 4, options)
    assert order == [site.layer for site in removed]
    assert measured == pytest.approx(damage, abs=1e-10)
    full = A.cumulative(qwen, batch, [Site("block", layer) for layer in range(qwen.n_layers)], mode="greedy",
                        options=options)
    assert [site.layer for site in full.sites[:4]] == order
    cut = max(damage[:2]) + 1e-9  # a budget the first two steps keep: the first step over it is kept, then stop
    over = next((step for step, value in enumerate(damage) if value > cut), 3)
    assert greedy_blocks(qwen, batch, 4, options, budget=cut)[0] == order[: over + 1] and over >= 2


def _final_stream(model, tokens):
    from streamlens import sites

    with torch.inference_mode():
        return model.run_to(tokens, sites.FINAL_STREAM)


def test_held_out_loss_is_the_exported_models_own_loss(qwen, tmp_path):
    """comparison.loss for greedy at k equals the cross-entropy of the exported model (plain HF) on the
    held-out windows, per text; its CI contains the mean; the budget stops greedy where it says."""
    choice_batch, held_out = _batches()
    result = run(qwen, choice_batch, held_out, PruneConfig(k=2, k_max=3, export_dir=str(tmp_path / "m"),
                                                           options=A.EvalOptions(n_boot=200)))
    logits = E.folder_logits(tmp_path / "m", held_out.tokens, "float64")
    own = F.cross_entropy(logits[:, :-1].transpose(1, 2), held_out.tokens[:, 1:], reduction="none").mean(-1)
    greedy = result.comparison.loss[result.comparison.strategies.index("greedy"), 1]
    assert result.removed == result.choice.removed("greedy", 2)
    assert torch.allclose(greedy, own, atol=1e-10, rtol=0)
    value, low, high = result.comparison.summary("greedy", 2)
    assert low <= value <= high and abs(value - float(own.mean())) <= 1e-10
    assert result.comparison.paired("greedy", 2) == (0.0, 0.0, 0.0)
    assert result.export.passed and result.export.hf <= 1e-10
    for saved in (result.choice, result.comparison, result.export):  # frozen results round-trip through files
        loaded = type(saved).load(saved.save(tmp_path / f"{type(saved).__name__}.safetensors"))
        assert loaded.to_dataframe().equals(saved.to_dataframe()) and loaded.provenance == saved.provenance
    full = choose(qwen, choice_batch, 5, A.EvalOptions(n_boot=40), strategies=("greedy",)).greedy_damage
    for budget in (0.0, float(full[0]) + 1e-9 if full[0] > 0 else 0.0, float(full.max()) + 1):
        fits = int((full > budget).nonzero()[0]) if (full > budget).any() else len(full)
        budgeted = choose(qwen, choice_batch, 5, A.EvalOptions(n_boot=40), budget=budget,
                          strategies=("greedy", "last"))
        assert budgeted.k_budget == fits and budgeted.k_max == min(len(full), fits + 1)  # stopped after the overrun
        assert torch.equal(budgeted.greedy_damage, full[: budgeted.k_max])


def test_choice_and_evaluation_windows_must_differ(qwen):
    choice_batch, held_out = _batches()
    with pytest.raises(ValueError, match="2 of the 8 evaluation windows also occur in the choice data"):
        D.check_disjoint(choice_batch, D.window_batch(torch.cat([choice_batch.tokens[:2], held_out.tokens[2:]])))
    with pytest.raises(ValueError, match="windows also occur"):
        run(qwen, choice_batch, choice_batch, PruneConfig(k=1))


def test_corpus_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "two"}\n{"text": "three"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert D.load_texts(str(tmp_path)) == ["one text", "two", "three"]
    stdlib = D.load_texts(D.STDLIB)
    assert len(stdlib) > 50 and sum(len(text) for text in stdlib) > 500_000  # far beyond 50k tokens
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        D.load_texts(str(tmp_path / "empty"))
