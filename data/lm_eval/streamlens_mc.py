"""Loader of the `streamlens_mc` lm-eval task: the JSONL beside this file, read offline from any folder."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(**_: object) -> dict:
    """{"test": a datasets.Dataset of {"id", "question", "choices", "answer"}} (lm-eval's custom_dataset hook)."""
    import datasets

    lines = (HERE / "streamlens_mc.jsonl").read_text(encoding="utf-8").splitlines()
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])}
