"""The package reads top to bottom: the import contract in pyproject.toml (`[tool.importlinter]`) holds on
this tree, and breaks on a copy with one upward import, a cycle inside a layer, a root import or a new
importlib use; and docs/architecture.md names every module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import streamlens

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(streamlens.__file__).resolve().parent   # the tree under test (editable install or PYTHONPATH)
CONFIG = ROOT / "pyproject.toml"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint(package: Path) -> subprocess.CompletedProcess[str]:
    """Run `lint-imports` with this repository's contracts on the `streamlens` package at `package`.

    A separate process, so that the package it finds on sys.path is `package`, not the one imported here.
    """
    env = {**os.environ, "PYTHONPATH": str(package.parent), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", LINT, str(CONFIG), "--no-cache", "--no-logo"],
                          cwd=package.parent, env=env, capture_output=True, text=True, timeout=120)


def broken(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The names of the contracts that `lint-imports` reported BROKEN."""
    return [found.group(1) for line in result.stdout.splitlines() if (found := re.match(r"(.+) BROKEN( \(.*\))?$", line))]


def test_the_import_contract_holds():
    result = lint(PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: \d+ kept, 0 broken", result.stdout), result.stdout


def _copy_with(tmp_path: Path, changes: dict[str, str]) -> Path:
    """A copy of the package with `code` appended to each module path in `changes`."""
    copy = tmp_path / "streamlens"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for module, code in changes.items():
        path = copy / module
        path.write_text(path.read_text() + "\n" + textwrap.dedent(code) + "\n")
    return copy


TOP, CYCLE = "streamlens reads top to bottom", "no import cycle"
# (changes to a copy, contracts that must break, a line of the report). An upward import breaks more than
# its own contract: it closes a cycle, and the layers contracts of the packages on that cycle see it too.
BREAKS = {
    "upward import": ({"results/base.py": "from streamlens.pages.html import Report"},
                      (TOP, CYCLE), "streamlens.results.base -> streamlens.pages.html"),
    "lazy upward import": ({"results/base.py": "def later():\n    from streamlens import cli"},
                           (TOP, CYCLE), "streamlens.results.base -> streamlens.cli"),
    "upward import inside a package": ({"ablation/spec.py": "from streamlens.ablation.engine import evaluate"},
                                       (CYCLE, "inside streamlens.ablation"),
                                       "streamlens.ablation.spec -> streamlens.ablation.engine"),
    "root import and attribute access": ({"results/base.py": "import streamlens\nlater = lambda: streamlens.cli"},
                                         ("no module imports the streamlens root",), "streamlens.results.base -> streamlens"),
    "importlib in a new place": ({"data.py": "import importlib"}, ("importlib only where",), "streamlens.data -> importlib"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_the_contract_breaks(tmp_path, case):
    changes, contracts, line = BREAKS[case]
    result = lint(_copy_with(tmp_path, changes))
    assert result.returncode == 1, result.stdout + result.stderr
    names = broken(result)
    assert all(any(name.startswith(contract) for name in names) for contract in contracts), result.stdout
    assert line in result.stdout, result.stdout


def test_a_cycle_inside_a_layer_breaks_the_contract(tmp_path):
    """identity and tunedlens share a layer: each importing the other is a cycle, caught twice."""
    copy = _copy_with(tmp_path, {"identity/measure.py": "from streamlens.tunedlens import train",
                                 "tunedlens/train.py": "from streamlens.identity import probe"})
    result = lint(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    names = broken(result)
    assert len(names) == 2, result.stdout
    assert names[0].startswith(TOP) and names[1].startswith(CYCLE), names
    for line in ("streamlens.identity.measure -> streamlens.tunedlens.train",
                 "streamlens.tunedlens.train -> streamlens.identity.probe"):
        assert line in result.stdout, result.stdout


def test_a_new_module_must_be_placed(tmp_path):
    copy = _copy_with(tmp_path, {})
    (copy / "newthing.py").write_text('"""Not in any layer yet."""\n')
    result = lint(copy)
    assert result.returncode == 1 and broken(result) == [broken(result)[0]] and broken(result)[0].startswith(TOP), result.stdout
    assert "streamlens.newthing" in result.stdout, result.stdout


def test_architecture_page_names_every_module():
    """docs/architecture.md's layer map mentions each top-level module and package, and no module that is gone."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    layout = page.split("## The layers", 1)[1].split("\n## ", 1)[0]
    present = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    missing = sorted(name for name in present - {"__init__"} if f"`streamlens/{name}" not in layout)
    assert not missing, f"docs/architecture.md does not mention {missing}"
    mentioned = set(re.findall(r"`streamlens/(\w+)(?:\.py|/)`", layout))
    gone = sorted(name for name in mentioned if name not in present)
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
