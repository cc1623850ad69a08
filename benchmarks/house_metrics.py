"""The house's structural numbers (issue 18): long functions, long modules, repeated code, private imports.

Prints, for the package under `streamlens/`:
- functions (and methods, nested ones included) over 60 and over 80 lines, each listed with its length
  (def line to last line; the issue's "flat table of options is exempt" is judged by a reader, so a
  function's body length, after its signature, is printed beside it);
- modules over 300 lines;
- the pair count of `duplicates --repo streamlens` (the repository's duplicate finder; "n/a" where it is
  not installed);
- private names (`_name`) used across modules: `from streamlens.x import _name` and `module._name` on an
  imported streamlens module, in streamlens/, tests/ and benchmarks/ (the house rule: zero).

Usage: python benchmarks/house_metrics.py [--root .]   (reads files only; exit 1 if a private import is found)
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

LONG, VERY_LONG, LONG_MODULE = 60, 80, 300


def functions(tree: ast.AST) -> list[tuple[str, int, int, int]]:
    """(qualified name, first line, total lines, body lines) of every function and method in `tree`."""
    found: list[tuple[str, int, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                total = child.end_lineno - child.lineno + 1
                body = child.end_lineno - child.body[0].lineno + 1
                found.append((name, child.lineno, total, body))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def private_uses(tree: ast.AST) -> list[str]:
    """`from streamlens... import _x` and `alias._x` on an imported streamlens module, as 'line: text'."""
    uses, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("streamlens"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    uses.append(f"{node.lineno}: from {node.module} import {alias.name}")
                else:
                    aliases.add(alias.asname or alias.name)  # may be a module: `from streamlens import ablation as A`
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("streamlens"):
                    aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and _root_name(node.value) in aliases):
            uses.append(f"{node.lineno}: {ast.unparse(node)}")
    return uses


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def duplicate_pairs(root: Path) -> str:
    """The pair count `duplicates --repo streamlens` reports (its first line's number), or why there is none."""
    if shutil.which("duplicates") is None:
        return "n/a (duplicates not installed)"
    out = subprocess.run(["duplicates", "--repo", str(root / "streamlens"), "--seconds", "120"], capture_output=True,
                         text=True, cwd=root).stdout
    first = out.splitlines()[0] if out else ""
    match = re.search(r"(\d+) pairs?", first)
    return match.group(1) if match else (f"0 ({first})" if first.startswith("no duplicates") else first or "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    root = Path(parser.parse_args().root)
    long, modules = [], []
    for path in sorted((root / "streamlens").rglob("*.py")):
        text = path.read_text()
        relative = path.relative_to(root)
        lines = len(text.splitlines())
        if lines > LONG_MODULE:
            modules.append((lines, str(relative)))
        long += [(total, body, f"{relative}:{line} {name}") for name, line, total, body in functions(ast.parse(text))
                 if total > LONG]
    private = []
    for folder in ("streamlens", "tests", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            private += [f"{path.relative_to(root)}:{use}" for use in private_uses(ast.parse(path.read_text()))]
    print(f"functions over {LONG} lines: {len(long)}; over {VERY_LONG}: {sum(total > VERY_LONG for total, _, _ in long)}")
    for total, body, where in sorted(long, reverse=True):
        print(f"  {total:4d} lines ({body} after the signature)  {where}")
    print(f"modules over {LONG_MODULE} lines: {len(modules)}")
    for lines, where in sorted(modules, reverse=True):
        print(f"  {lines:5d}  {where}")
    print(f"duplicates --repo streamlens: {duplicate_pairs(root)} pairs")
    print(f"private names used across modules (streamlens/, tests/, benchmarks/): {len(private)}")
    for use in private:
        print(f"  {use}")
    return 1 if private else 0


if __name__ == "__main__":
    sys.exit(main())
