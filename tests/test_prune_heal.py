"""Judging a pruned model against the full one (prune.evaluate) and healing it (prune.heal, model.train).

Every number is checked against a plain-PyTorch computation on HF models read straight from the
folders (no bridge, no streamlens code); the pruned model is made here by copying the kept blocks of
a tiny 4-block model into a 2-block one (the export proper is `streamlens prune`'s job).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamlens.data import prompt_batch, window_batch
from streamlens.model import load_model
from streamlens.model.generate import generate_texts, greedy, measure_speed
from streamlens.model.hf import parameter_count, plain_copy, weights_bytes
from streamlens.model.train import TrainSettings, fit, merge, save_folder, step_loss, train, wrap_lora
from streamlens.prune.evaluate import EvaluateSettings, compare, prediction_metrics
from streamlens.prune.heal import heal
from streamlens.results.pruned import HealResult, PrunedComparison
from streamlens.testing import tiny_model_folder, tiny_tokenizer

KEEP = (0, 3)  # blocks 1 and 2 of 4 removed
QUICK = EvaluateSettings(prompts=None, generation_prompts=("w3 w4 w5", "w9 w8"), new_tokens=4,
                         speed_prompt="w3 w4 w5 w6 w7", speed_new_tokens=3, repeats=1, n_boot=200)


def hf_from(folder: Path) -> torch.nn.Module:
    """The plain HF model of a folder in float64 as shipped (the independent reference: no streamlens
    code; HF rounds its RMSNorm and softmax through float32, so it agrees to ~1e-9, not 1e-12)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
    return model.eval()


def drop_blocks_folder(source: Path, out: Path, keep: tuple[int, ...]) -> Path:
    """A llama folder with only the blocks `keep` (renumbered 0..), everything else copied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = len(keep)
    pruned = AutoModelForCausalLM.from_config(config)
    state = {}
    for name, tensor in full.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.split(".", 3)[2:]
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        state[name] = tensor
    pruned.load_state_dict(state, strict=True)
    pruned.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune")
    full = tiny_model_folder(root / "full", arch="llama", n_layers=4)
    return full, drop_blocks_folder(full, root / "pruned", KEEP)


@pytest.fixture(scope="module")
def pair(folders):
    return tuple(load_model(str(folder), dtype="float64") for folder in folders)


@pytest.fixture(scope="module")
def windows() -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out [6, 10], training [8, 10]) random windows of the tiny vocabulary."""
    tokens = torch.randint(3, 64, (14, 10), generator=torch.Generator().manual_seed(3))
    return tokens[:6], tokens[6:]


@pytest.fixture(scope="module")
def comparison(pair, windows) -> PrunedComparison:
    full, pruned = pair
    return compare(full, pruned, window_batch(windows[0], description="held-out"), QUICK)


# ----- compare ---------------------------------------------------------------------------------
def test_a_model_against_itself_differs_in_nothing(pair, windows, comparison):
    full, _ = pair
    same = compare(full, full, window_batch(windows[0]), QUICK)
    assert torch.equal(same.loss[0], same.loss[1])
    assert same.kl.abs().max() < 1e-14 and torch.equal(same.agreement, torch.ones(6, dtype=torch.float64))
    assert same.generations_full == same.generations_pruned
    table = same.to_dataframe().set_index(["metric", "model"])
    assert table.loc[("loss", "pruned - full"), "estimate"] == 0.0
    # the pruned model does differ: the same code sees it
    assert comparison.kl.min() > 1e-6 and not torch.equal(comparison.loss[0], comparison.loss[1])


def test_loss_kl_agreement_match_plain_pytorch(folders, comparison, windows):
    tokens = windows[0]
    with torch.no_grad():
        log_p = hf_from(folders[0])(tokens).logits[:, :-1].log_softmax(-1)  # [text, pred, vocab]
        log_q = hf_from(folders[1])(tokens).logits[:, :-1].log_softmax(-1)
    labels = tokens[:, 1:]
    loss_p = torch.nn.functional.nll_loss(log_p.transpose(1, 2), labels, reduction="none").mean(-1)
    loss_q = torch.nn.functional.nll_loss(log_q.transpose(1, 2), labels, reduction="none").mean(-1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean(-1)
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean(-1)
    torch.testing.assert_close(comparison.loss, torch.stack([loss_p, loss_q]), rtol=0, atol=1e-7)
    torch.testing.assert_close(comparison.kl, kl, rtol=0, atol=1e-7)
    torch.testing.assert_close(comparison.agreement, agreement, rtol=0, atol=0)
    table = comparison.to_dataframe().set_index(["metric", "model"])
    assert table.loc[("loss", "pruned - full"), "estimate"] == pytest.approx(float((loss_q - loss_p).mean()), abs=1e-7)
    low, high = table.loc[("loss", "pruned - full"), ["low", "high"]]
    assert low <= float((loss_q - loss_p).mean()) <= high


def test_prompt_accuracy_is_the_top_token_after_each_prompt(pair, folders, tmp_path):
    full, pruned = pair
    prompts = [("w3 w4 w5", " w6"), ("w10 w11", " w12"), ("w20 w21 w22 w23", " w24")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in prompts))
    correct = prediction_metrics(full, pruned, prompt_batch(full, [(p, t) for p, t in prompts]))["top1"]
    expected = []
    for folder in folders:
        hf = hf_from(folder)
        row = []
        for prompt, target in prompts:
            ids = full.to_tokens(prompt)
            with torch.no_grad():
                row.append(float(hf(ids).logits[0, -1].argmax() == full.token_id(target)))
        expected.append(row)
    assert correct.tolist() == expected
    settings = EvaluateSettings(**{**QUICK.__dict__, "prompts": str(path)})
    result = compare(full, pruned, window_batch(full.to_tokens("w3 w4 w5 w6")), settings)
    assert result.prompt_correct.tolist() == expected


def test_size_speed_and_generations(folders, comparison):
    hf_full, hf_pruned = hf_from(folders[0]), hf_from(folders[1])
    assert comparison.parameters == (parameter_count(hf_full), parameter_count(hf_pruned))
    assert comparison.parameters[1] < comparison.parameters[0]
    sizes = tuple(sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in folders)
    assert comparison.file_bytes == sizes and sizes[1] < sizes[0]
    assert all(speed > 0 and speed < float("inf") for speed in comparison.tokens_per_s + comparison.decode_tokens_per_s)
    assert all(isinstance(text, str) and text for text in comparison.generations_full + comparison.generations_pruned)
    assert len(comparison.generations()) == 2 and comparison.speedup > 0


def test_greedy_generation_is_the_argmax_of_full_forwards(pair, folders):
    full, _ = pair
    hf = hf_from(folders[0])
    prompt = full.to_tokens("w3 w4 w5")
    ids, prefill, decode = greedy(plain_copy(full), prompt, 5)
    sequence = prompt[0].tolist()
    for token in ids.tolist():  # each new token: argmax of the uncached forward over all before it
        with torch.no_grad():
            assert token == int(hf(torch.tensor([sequence])).logits[0, -1].argmax())
        sequence.append(token)
    assert prefill > 0 and decode > 0
    assert generate_texts(full, ["w3 w4 w5"], 5) == (full.tokenizer.decode(ids.tolist()),)


def test_comparison_saves_and_loads(comparison, tmp_path):
    back = PrunedComparison.load(comparison.save(tmp_path / "c.safetensors"))
    assert back.to_dataframe().equals(comparison.to_dataframe()) and back.generations().equals(comparison.generations())
    assert back.provenance == comparison.provenance


def test_bad_input_is_refused(pair, folders, tmp_path):
    full, _ = pair
    other = load_model(str(tiny_model_folder(tmp_path / "other", arch="llama", n_layers=2)), dtype="float64")
    object.__setattr__(other, "tokenizer", type("T", (), {"get_vocab": lambda self: {"a": 0}})())
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        compare(full, other, window_batch(full.to_tokens("w3 w4 w5")), QUICK)
    with pytest.raises(ValueError, match="does not exist"):
        weights_bytes(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 2"):
        measure_speed([full], "w3 w4", new_tokens=1)
    with pytest.raises(ValueError, match="repeats 0"):
        measure_speed([full], "w3 w4", repeats=0)


# ----- train and heal --------------------------------------------------------------------------
def test_heal_with_zero_steps_changes_nothing(pair, windows, tmp_path):
    full, pruned = pair
    healed, result = heal(pruned, windows[1], window_batch(windows[0]), tmp_path / "healed",
                          TrainSettings(steps=0), teacher=full)
    assert torch.equal(healed.run(windows[0]), pruned.run(windows[0]))
    assert torch.equal(result.loss_after, result.loss_before) and torch.equal(result.kl_after, result.kl_before)
    assert result.train_loss.numel() == 0
    back = HealResult.load(result.save(tmp_path / "h.safetensors"))
    assert back.to_dataframe().equals(result.to_dataframe())


def test_lora_heal_lowers_the_loss_on_its_texts(pair, windows, tmp_path):
    _, pruned = pair
    settings = TrainSettings(steps=12, mode="lora", lr=1e-2, batch_size=4, lora_rank=4)
    healed, result = heal(pruned, windows[1], window_batch(windows[0]), tmp_path / "healed", settings)
    on_train = window_batch(windows[1])
    before = prediction_metrics(pruned, pruned, on_train)["loss"][1].mean()
    after = prediction_metrics(healed, healed, on_train)["loss"][1].mean()
    assert after < before - 0.05, (float(before), float(after))
    assert result.train_loss.shape == (12,) and result.kl_after.numel() == 0
    assert result.cpu_seconds > 0 and (tmp_path / "healed" / "config.json").is_file()
    rows = result.to_dataframe().set_index(["metric", "stage"])
    assert rows.loc[("loss", "after - before"), "estimate"] == pytest.approx(
        float((result.loss_after - result.loss_before).mean()))


def test_a_healed_gguf_file_is_proved_against_the_trained_model(pair, windows, tmp_path, monkeypatch):
    """With gguf=True the healed folder also holds a float32 GGUF file, read back by transformers' GGUF
    reader and proved with the float32 tolerance (the float64 model's own tolerance would refuse it)."""
    from streamlens.model import gguf
    from streamlens.model.export import GGUF_NAME, LOGIT_TOLERANCE
    from streamlens.testing import TINY_VOCAB

    words = gguf.GGUFVocabulary(tuple(f"w{i}" for i in range(TINY_VOCAB)), (1,) * TINY_VOCAB, (), 1, 2)
    monkeypatch.setattr(gguf, "bpe_vocabulary", lambda tokenizer: words)  # the tiny word-level tokenizer has no BPE form
    full, pruned = pair
    settings = TrainSettings(steps=2, mode="full", lr=1e-2, batch_size=4)
    _, result = heal(pruned, windows[1], window_batch(windows[0]), tmp_path / "healed", settings, teacher=full,
                     proof_tokens=windows[0][:2], gguf=True)
    assert (tmp_path / "healed" / GGUF_NAME).is_file()
    assert set(result.proof) == {"transformers", "streamlens", "gguf"} and result.proved
    assert LOGIT_TOLERANCE["float64"] < result.proof["gguf"] <= result.gguf_tolerance == LOGIT_TOLERANCE["float32"]
    back = HealResult.load(result.save(tmp_path / "h.safetensors"))
    assert back.proof == result.proof and back.gguf_tolerance == result.gguf_tolerance and back.proved


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_is_deterministic_with_a_seed(pair, windows, mode):
    full, pruned = pair
    runs = [train(pruned, windows[1], TrainSettings(steps=3, mode=mode, loss="distill", lr=1e-2, seed=seed), full)
            for seed in (5, 5, 6)]
    states = [run.hf_model.state_dict() for run in runs]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert torch.equal(runs[0].losses, runs[1].losses)
    assert any(not torch.equal(states[0][name], states[2][name]) for name in states[0])  # the seed matters
    before = plain_copy(pruned).state_dict()
    assert any(not torch.equal(before[name], states[0][name]) for name in before)  # training changed weights


def test_merged_lora_computes_the_adapted_models_logits(pair, windows):
    _, pruned = pair
    adapted = wrap_lora(plain_copy(pruned), rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        untrained = adapted(windows[0]).logits
    assert torch.equal(untrained, plain_copy(pruned)(windows[0]).logits)  # B = 0 at the start
    fit(adapted, windows[1], TrainSettings(steps=3, lr=1e-2))
    with torch.no_grad():
        trained = adapted(windows[0]).logits
        merged = merge(adapted)(windows[0]).logits
    assert (trained - untrained).abs().max() > 1e-4
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-10)


def test_distillation_loss_is_kl_to_the_teacher(pair, windows):
    full, pruned = pair
    with torch.no_grad():
        assert float(step_loss(plain_copy(full), windows[0], "distill", full)) == pytest.approx(0.0, abs=1e-12)
        loss = float(step_loss(plain_copy(pruned), windows[0], "distill", full))
        log_p, log_q = full.run(windows[0]).log_softmax(-1), pruned.run(windows[0]).log_softmax(-1)
    assert loss == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum(-1).mean()), abs=1e-10)


def test_heal_refuses_bad_input_and_writes_nothing(pair, windows, tmp_path):
    full, pruned = pair
    batch = window_batch(windows[0])
    with pytest.raises(ValueError, match="heal mode 'bogus'"):
        TrainSettings(steps=1, mode="bogus")
    with pytest.raises(ValueError, match="steps -1"):
        TrainSettings(steps=-1)
    with pytest.raises(ValueError, match="needs the teacher"):
        heal(pruned, windows[1], batch, tmp_path / "a", TrainSettings(steps=1, loss="distill"))
    with pytest.raises(ValueError, match="is held-out window"):
        heal(pruned, windows[0], batch, tmp_path / "b", TrainSettings(steps=1))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        heal(pruned, windows[1], batch, busy, TrainSettings(steps=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"] and (busy / "keep.txt").read_text() == "mine"


def test_an_interrupted_save_leaves_no_folder(pair, tmp_path):
    _, pruned = pair

    class Broken:
        def save_pretrained(self, folder):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_folder(plain_copy(pruned), Broken(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
