"""Run an exported model folder under lm-evaluation-harness's `hf` model on local task files.

The shipped task `streamlens_mc` (`data/lm_eval/`: YAML, JSONL of 24 four-way questions, and the
loader lm-eval calls) runs offline from any folder. The same run from a shell:

    lm_eval --model hf --model_args pretrained=FOLDER,dtype=float32 --include_path data/lm_eval \\
            --tasks streamlens_mc --device cpu --batch_size 8

lm-eval scores each choice by the summed log-probability of its tokens after the question and
counts the argmax; `acc` is the share of questions where that is the answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK = "streamlens_mc"


def task_folder() -> Path:
    """The folder of the shipped lm-eval tasks: `streamlens/_data/lm_eval` in a wheel, else `data/lm_eval`."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "_data" / "lm_eval", package.parent / "data" / "lm_eval"):
        if (folder / f"{TASK}.yaml").is_file():
            return folder
    raise FileNotFoundError(f"the lm-eval task {TASK} is not installed (looked in {package / '_data'} and "
                            f"{package.parent / 'data'})")


def run_tasks(folder: str | os.PathLike[str], tasks: Sequence[str] = (TASK,), include_path: str | Path | None = None,
              dtype: str = "float32", batch_size: int = 8, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on a local HF folder, on the CPU, offline.

    Args:
        folder: an HF model folder (e.g. an exported pruned model).
        tasks: task names found under `include_path`.
        include_path: a folder of task YAML files; None for the shipped `task_folder()`.
        limit: evaluate only the first `limit` documents of each task.

    Returns:
        lm-eval's results dictionary (`["results"][task]["acc,none"]` is the accuracy); the
        per-document log-likelihoods are under `["samples"][task]`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json): give an exported HF folder")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("running lm-evaluation-harness needs lm-eval: pip install 'streamlens[prune]'") from None

    # include_defaults=False: indexing lm-eval's thousands of built-in task files costs ~20 s of CPU
    manager = TaskManager(include_path=str(include_path or task_folder()), include_defaults=False)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype={dtype},trust_remote_code=False",
                                   tasks=list(tasks), device="cpu", batch_size=batch_size, limit=limit,
                                   task_manager=manager, log_samples=True)
