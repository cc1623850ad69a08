"""A saved model folder runs under lm-evaluation-harness's `hf` model on the shipped local task.

lm-eval's per-choice log-likelihoods and its accuracy are checked against a plain HF computation:
log p(choice tokens | question) summed, argmax over the choices. The shipped questions use English
words the tiny word-level tokenizer does not know (every word would be <unk> and all choices tie),
so the test runs the shipped YAML and loader on a copy whose JSONL uses the tiny vocabulary.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from streamlens.model.lmeval import TASK, run_tasks, task_folder
from streamlens.testing import tiny_model_folder, tiny_tokenizer


def test_shipped_task_is_well_formed():
    rows = [json.loads(line) for line in (task_folder() / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 20
    assert all(len(row["choices"]) == 4 and 0 <= row["answer"] < 4 and row["question"].strip() for row in rows)
    assert (task_folder() / f"{TASK}.yaml").is_file() and (task_folder() / f"{TASK}.py").is_file()


def test_a_saved_folder_runs_under_lm_eval_and_matches_hf(tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    folder = tiny_model_folder(tmp_path / "model", arch="llama", n_layers=2)
    tasks = shutil.copytree(task_folder(), tmp_path / "tasks")
    rng = random.Random(0)
    rows = [{"id": i, "question": " ".join(f"w{rng.randrange(3, 64)}" for _ in range(4)),
             "choices": [f"w{rng.randrange(3, 64)}" for _ in range(4)], "answer": rng.randrange(4)} for i in range(8)]
    (tasks / f"{TASK}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = run_tasks(folder, include_path=tasks, batch_size=4)

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = tiny_tokenizer()
    correct = []
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc"]["id"])
    for row, sample in zip(rows, samples):
        context = tokenizer(row["question"]).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["question"] + " " + choice).input_ids
            with torch.no_grad():
                log_probs = hf(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(whole[len(context):])
            scores.append(float(log_probs[len(context) - 1:].gather(-1, targets[:, None]).sum()))
        lm_eval_scores = [response[0] for response in sample["filtered_resps"]]
        assert lm_eval_scores == pytest.approx(scores, abs=1e-4)
        correct.append(float(max(range(4), key=lambda k: scores[k]) == row["answer"]))
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_lm_eval_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a model folder"):
        run_tasks(tmp_path)
