"""The package reads top to bottom: each module imports only from layers above it (checked on the
import statements themselves, lazy and TYPE_CHECKING imports included), and the README's layout
names every module."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "streamlens"

# Top to bottom. A module may import from its own layer and the layers above it, never below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "files", "sites", "stats"),       # foundations: no streamlens imports (the package's
                                                   # own __init__ loads its exports lazily, by name)
    ("model", "testing"),                          # the only code touching transformer-lens / HF
    ("data",),                                     # text sources, windows, prompt sets
    ("results",),                                  # frozen result classes (what analyses return)
    ("metrics", "recording", "decomposition"),     # record, decompose, metrics
    ("ablation",),                                 # spec, options, replace, apply, engine
    ("highway",),                                  # toy, real
    ("exactness",),                                # streamlens check: is streamlens exact on a model
    ("corpus", "sources", "identity", "tunedlens"),  # what the stream carries: windows by text, attention
                                                   # sources, token identity, the tuned lens
    ("layers",),                                   # scores, repair, verdict, study
    ("prune",),                                    # judge a pruned model against the full one, heal it
    ("plots",),                                    # figures from results only
    ("pages",),                                    # HTML pages composed from figures
    ("cli", "__main__"),                           # parse -> call -> page -> write
)
# Inside a package, the same rule over its modules (a module may import those listed before it).
INNER: dict[str, tuple[str, ...]] = {
    "ablation": ("spec", "options", "replace", "apply", "engine", "swap", "checkpoint", "backends", "attribute",
                 "__init__"),
    "highway": ("real", "toy", "__init__"),
    "layers": ("scores", "repair", "verdict", "study", "__init__"),
    "model": ("fidelity", "handle", "cache", "folders", "loading", "hf", "generate", "train", "lmeval", "__init__"),
    "results": ("base", "stream", "ablation", "highway", "check", "sources", "identity", "tunedlens", "layers",
                "pruned", "__init__"),
    "identity": ("probe", "measure", "__init__"),
    "tunedlens": ("train", "evaluate", "__init__"),
    "prune": ("evaluate", "heal", "__init__"),
    "pages": ("html", "ablation", "attribution", "highway", "carry", "layers", "report", "__init__"),
}


def _top(module: str) -> str:
    """'streamlens.ablation.engine' -> 'ablation'."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _rank(top: str) -> int:
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise KeyError(top)


def _imports(path: Path, package_root: Path) -> list[tuple[int, str]]:
    """(line, module) of every `streamlens.*` import in a file, at any depth of the syntax tree."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("streamlens.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                parts = here.split(".")[: -node.level]
                base = ".".join([*parts, base] if base else parts)
            if base != "streamlens" and not base.startswith("streamlens."):
                continue
            for alias in node.names:  # `from streamlens.ablation import replace` imports a module
                candidate = package_root.parent.joinpath(*f"{base}.{alias.name}".split("."))
                is_module = candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    return found


def violations(package_root: Path) -> list[str]:
    """Every import that goes up the layer list (or names a module the list does not place)."""
    problems = []
    for path in sorted(package_root.rglob("*.py")):
        parts = path.relative_to(package_root).with_suffix("").parts
        top = parts[0]
        try:
            rank = _rank(top)
        except KeyError:
            problems.append(f"{path.relative_to(package_root.parent)}: module {top!r} is in no layer of LAYERS")
            continue
        for line, module in _imports(path, package_root):
            target = _top(module)
            try:
                target_rank = _rank(target)
            except KeyError:
                problems.append(f"{path.relative_to(package_root.parent)}:{line} imports {module}, in no layer")
                continue
            where = f"{path.relative_to(package_root.parent)}:{line} imports {module}"
            if target_rank > rank:
                problems.append(f"{where}: layer {LAYERS[target_rank]} is below {LAYERS[rank]}")
            elif target == top and top in INNER and len(parts) > 1:
                order = INNER[top]
                inner_target = module.split(".")[2] if module.count(".") >= 2 else "__init__"
                if inner_target in order and parts[1] in order and order.index(inner_target) >= order.index(parts[1]):
                    if inner_target != parts[1]:
                        problems.append(f"{where}: inside {top}/, {inner_target} comes after {parts[1]}")
    return problems


def test_no_import_goes_up_the_layers():
    assert violations(PACKAGE) == []


def test_every_inner_module_is_placed():
    for package, order in INNER.items():
        present = {path.stem for path in (PACKAGE / package).glob("*.py")}
        assert present <= set(order), f"{package}/ has modules {sorted(present - set(order))} not in INNER"


@pytest.mark.parametrize("upward", [
    "from streamlens.pages.html import Report",            # results -> pages
    "import streamlens.plots.style",                       # plain import
    "def later():\n    from streamlens import cli",        # lazy import inside a function
])
def test_the_check_fails_on_an_upward_import(tmp_path, upward):
    """A copy of the package with one upward import added to results/base.py is caught."""
    import shutil

    copy = tmp_path / "streamlens"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "results" / "base.py"
    base.write_text(base.read_text() + "\n" + textwrap.dedent(upward) + "\n")
    found = violations(copy)
    assert len(found) == 1 and found[0].startswith("streamlens/results/base.py"), found


def test_the_check_fails_on_an_inner_upward_import(tmp_path):
    import shutil

    copy = tmp_path / "streamlens"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spec = copy / "ablation" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom streamlens.ablation.engine import evaluate\n")
    found = violations(copy)
    assert len(found) == 1 and "inside ablation/, engine comes after spec" in found[0], found


def test_readme_layout_names_every_module():
    """The README's Layout section mentions each top-level module and package, and no module that is gone."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    names -= {"__init__", "__main__"}
    missing = sorted(name for name in names if name not in layout)
    assert not missing, f"README layout does not mention {missing}"
    import re

    mentioned = set(re.findall(r"`streamlens/(\w+)(?:\.py|/)`", layout))
    gone = sorted(name for name in mentioned if name and "/" not in name and name not in names)
    assert not gone, f"README layout names modules that do not exist: {gone}"
