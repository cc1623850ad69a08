"""Data sources, windows, prompt sets; metrics against torch's own formulas; bootstrap sanity."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from streamlens import data as D
from streamlens import metrics as M


# ----- sources ----------------------------------------------------------------------------------
def test_builtin_text_set_is_varied_and_a_few_kilobytes():
    texts = D.load_texts(None)
    assert D.load_texts("builtin") == texts
    assert 5_000 < sum(len(t) for t in texts) < 50_000 and len(texts) >= 8
    assert any("def " in t for t in texts) and any("The " in t for t in texts)  # code and prose
    assert (D.data_dir() / "README.md").is_file()


def test_string_txt_and_jsonl_sources(tmp_path):
    assert D.load_texts("just this sentence") == ["just this sentence"]
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n")
    assert D.load_texts(str(txt)) == ["line one\nline two"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "first"}\n\n{"text": "second", "source": "x"}\n')
    assert D.load_texts(str(jsonl)) == ["first", "second"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "data file .*missing.txt does not exist"),
        ("empty.txt", "  \n\n", "data file .*empty.txt is empty"),
        ("empty.jsonl", "\n", "data file .*empty.jsonl is empty"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": "ok",\n', "bad.jsonl line 3: not valid JSON"),
        ("list.jsonl", '{"text": "ok"}\n[1, 2]\n', "list.jsonl line 2: expected a JSON object"),
        ("notext.jsonl", '{"txt": "typo"}\n', 'notext.jsonl line 1: expected a JSON object with a non-empty "text"'),
        ("data.csv", "a,b\n", "unsupported type: use a .txt or .jsonl file"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        D.load_texts(str(path))


def test_prompts_builtin_and_errors(tmp_path):
    prompts = D.load_prompts(None)
    assert ("The capital of France is", " Paris") in prompts and len(prompts) >= 20
    assert D.is_prompt_source("prompts") and not D.is_prompt_source(None)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    assert D.is_prompt_source(str(bad))
    with pytest.raises(ValueError, match='p.jsonl line 2: expected a JSON object with "prompt" and "target"'):
        D.load_prompts(bad)


# ----- windows and batches ----------------------------------------------------------------------
def test_windows_cut_each_text_and_go_round_robin(tiny):
    texts = [" ".join(f"w{i}" for i in range(3, 23)), " ".join(f"w{i}" for i in range(30, 37))]
    windows = D.token_windows(tiny, texts, window=6)
    ids = [tiny.tokenizer(t).input_ids for t in texts]
    # text 0 gives 3 windows (20 tokens), text 1 one (7 tokens); round-robin: t0w0, t1w0, t0w1, t0w2
    expected = [ids[0][0:6], ids[1][0:6], ids[0][6:12], ids[0][12:18]]
    assert windows.tolist() == expected
    assert D.token_windows(tiny, texts, window=6, max_windows=2).tolist() == expected[:2]
    with pytest.raises(ValueError, match="window 30 is longer than every text"):
        D.token_windows(tiny, texts, window=30)
    with pytest.raises(ValueError, match="window 1 too short"):
        D.token_windows(tiny, texts, window=1)


def test_window_batch_positions():
    tokens = torch.arange(12).reshape(2, 6)
    batch = D.window_batch(tokens)
    assert batch.labels[0].tolist() == [1, 2, 3, 4, 5, -1] and batch.n_scored == 10
    assert D.window_batch(tokens, "last").scored[0].tolist() == [False] * 4 + [True, False]
    assert D.window_batch(tokens, "2:").scored[1].tolist() == [False, False, True, True, True, False]
    with pytest.raises(ValueError, match="positions 'middle' not understood"):
        D.window_batch(tokens, "middle")
    with pytest.raises(ValueError, match="positions '9:' select no prediction"):
        D.window_batch(tokens, "9:")


def test_prompt_batch_pads_right_and_scores_the_target(tiny):
    batch = D.prompt_batch(tiny, [("w5 w6 w7", "w8"), ("w9", "w10")])
    assert batch.tokens.shape == (2, 3) and batch.valid.tolist() == [[True] * 3, [True, False, False]]
    assert batch.scored.tolist() == [[False, False, True], [True, False, False]]
    assert batch.labels[1, 0] == batch.targets[1] == tiny.token_id("w10")
    with pytest.raises(ValueError, match="is not a single token"):
        D.prompt_batch(tiny, [("w5", "w6 w7")])


@pytest.mark.real
def test_builtin_prompt_targets_are_single_smollm2_tokens(smol):
    batch = D.load_batch(smol, "prompts")
    assert batch.n_texts == len(D.load_prompts(None)) and batch.targets is not None


# ----- metrics ----------------------------------------------------------------------------------
def _logits(seed, n=7, vocab=50):
    return torch.randn(n, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3


def test_textbook_metrics_match_torch_formulas():
    p, q = _logits(0), _logits(1)
    labels, targets = torch.arange(7) * 3, torch.arange(7) + 10
    values = M.token_metrics_from_logits(p, q, labels, targets, M.METRICS)
    assert torch.allclose(values[0], F.cross_entropy(q, labels, reduction="none") - F.cross_entropy(p, labels, reduction="none"))
    kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(values[1], kl) and (values[1] >= 0).all()
    assert torch.equal(values[2], (p.argmax(-1) == q.argmax(-1)).double())
    rows = torch.arange(7)
    assert torch.allclose(values[3], q[rows, targets] - p[rows, targets])
    assert torch.allclose(values[4], q.softmax(-1)[rows, targets] - p.softmax(-1)[rows, targets])


@pytest.mark.parametrize("chunk", [7, 16, 50, 4096])
def test_chunked_logit_stats_match_full_logits(chunk):
    """`logit_stats` (no [N, vocab] tensor kept) gives the textbook metrics, for any chunk size."""
    generator = torch.Generator().manual_seed(2)
    W_U = torch.randn(8, 50, dtype=torch.float64, generator=generator)
    b_U = torch.randn(50, dtype=torch.float64, generator=generator)
    clean, ablated = (torch.randn(7, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    labels, targets = torch.arange(7) * 7, torch.arange(7) + 40
    clean_stats, reference = M.logit_stats(clean, W_U, b_U, labels, targets, None, chunk=chunk)
    ablated_stats, _ = M.logit_stats(ablated, W_U, b_U, labels, targets, reference, chunk=chunk)
    fused = M.token_metrics(clean_stats, ablated_stats, M.METRICS)
    textbook = M.token_metrics_from_logits(clean @ W_U + b_U, ablated @ W_U + b_U, labels, targets, M.METRICS)
    assert (fused - textbook).abs().max() < 1e-12
    same = M.token_metrics(clean_stats, M.logit_stats(clean, W_U, b_U, labels, targets, reference, chunk)[0], M.METRICS)
    assert same.tolist() == [[0.0] * 7, [0.0] * 7, [1.0] * 7, [0.0] * 7, [0.0] * 7]  # nothing changed: exact


def test_metric_name_checks():
    assert M.default_metrics(False) == M.TEXT_METRICS
    with pytest.raises(ValueError, match="unknown metric 'acc': choose from loss_increase"):
        M.check_metrics(["acc"], False)
    with pytest.raises(ValueError, match="needs a prompt set with targets"):
        M.check_metrics(["target_prob_change"], False)


def test_per_text_means():
    values = torch.tensor([[1.0, 3.0, 10.0, 20.0, 30.0]])
    assert M.per_text_means(values, torch.tensor([0, 0, 1, 1, 1]), 2).tolist() == [[2.0, 20.0]]


# ----- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_ci_contains_estimate_and_is_seeded():
    per_text = torch.randn(4, 3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).exp()
    estimate, low, high = M.bootstrap_ci(per_text, n_boot=500, seed=1)
    assert torch.allclose(estimate, per_text.mean(-1))
    assert (low <= estimate).all() and (estimate <= high).all() and (low < high).all()
    again = M.bootstrap_ci(per_text, n_boot=500, seed=1)
    assert torch.equal(again[1], low) and not torch.equal(M.bootstrap_ci(per_text, n_boot=500, seed=2)[1], low)


def test_bootstrap_ci_narrows_with_more_texts():
    generator = torch.Generator().manual_seed(5)
    widths = []
    for n_texts in (20, 80, 320):
        per_text = 1.0 + 0.5 * torch.randn(n_texts, dtype=torch.float64, generator=generator)
        _, low, high = M.bootstrap_ci(per_text, n_boot=2000, seed=0)
        widths.append(float(high - low))
    assert widths[0] > widths[1] > widths[2]
    # ~ 2 * 1.96 * sigma / sqrt(n): a 4x larger set halves the width (within sampling noise)
    assert 1.5 < widths[0] / widths[1] < 2.7 and 1.5 < widths[1] / widths[2] < 2.7


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(11)
    hits = 0
    for trial in range(200):
        per_text = torch.randn(30, dtype=torch.float64, generator=generator)  # true mean 0
        _, low, high = M.bootstrap_ci(per_text, n_boot=400, seed=trial)
        hits += int(low <= 0 <= high)
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_one_text_has_no_spread():
    estimate, low, high = M.bootstrap_ci(torch.tensor([[0.7]]))
    assert float(low) == float(high) == float(estimate) == pytest.approx(0.7)


def test_data_readme_says_license():
    readme = (D.data_dir() / "README.md").read_text()
    assert "license" in readme.lower()


def test_prompts_file_is_json_lines():
    for line in (D.data_dir() / "prompts.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert set(record) == {"prompt", "target"}
