"""The house rule benchmarks/house_metrics.py measures: no module uses another module's private (`_name`) helper."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _metrics():
    spec = importlib.util.spec_from_file_location("house_metrics", ROOT / "benchmarks" / "house_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_private_name_finder_sees_both_forms():
    source = ("from streamlens.ablation import engine as E\nfrom streamlens.data import _kind, load_texts\n"
              "from os import _exit\nE._engine(1); E.Engine.of(2); E.__name__\n")
    assert sorted(_metrics().private_uses(ast.parse(source))) == [
        "2: from streamlens.data import _kind", "4: E._engine"]


def test_no_private_name_is_used_across_modules():
    metrics = _metrics()
    found = [f"{path.relative_to(ROOT)}:{use}" for folder in ("streamlens", "tests", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for use in metrics.private_uses(ast.parse(path.read_text()))]
    assert found == []
