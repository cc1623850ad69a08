"""The public API stays: every name the README, the manual (docs/) and the notebooks use still imports
(moves inside the package must not break a user's code)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module, names) as written in README.md, docs/*.md and notebooks/*.ipynb
PUBLIC = {
    "streamlens": ["load_model", "Model", "ModelLoadError", "Site", "record", "decompose", "logit_lens",
                   "StreamWrites", "LogitDecomposition", "LogitLens", "Provenance"],
    "streamlens.ablation": ["Ablation", "ablated", "evaluate", "sweep", "cumulative", "by_damage", "units",
                            "EvalOptions", "METHODS", "EFFECTS", "UNIT_KINDS", "CUMULATIVE_MODES", "donor_rows",
                            "attribute", "verify", "agreement", "RayBackend", "LocalBackend", "Checkpoint"],
    "streamlens.ablation.swap": ["Swap", "evaluate"],
    "streamlens.data": ["load_batch", "load_prompts", "text_windows", "TextWindows"],
    "streamlens.sources": ["attention_sources"],
    "streamlens.identity": ["token_identity", "TokenIdentity"],
    "streamlens.tunedlens": ["TunedLens", "train_tuned_lens", "compare_lenses", "LensComparison"],
    "streamlens.importance": ["layer_study", "StudyConfig", "LayerStudy", "stream_scores", "spearman_ci", "self_repair"],
    "streamlens.plots.attribution": ["estimate_vs_exact", "side_by_side"],
    "streamlens.plots.layers": ["removal_profile", "span_curve", "repair_scatter"],
    "streamlens.highway": ["ToyConfig", "toy_highway", "skip_gradients", "highway_tokens", "make_stack",
                           "torch_init_ratio", "zero_branch_check", "ToyHighway", "RealHighway"],
    "streamlens.sites": ["Site"],
    "streamlens.plots.decomposition": ["waterfall", "layer_bars", "head_heatmap"],
    "streamlens.plots.stream": ["write_norms", "stream_growth", "write_cosines"],
    "streamlens.plots.lens": ["lens_heatmap", "kl_to_final"],
    "streamlens.plots.ablation": ["damage", "direct_vs_total", "cumulative_curve"],
    "streamlens.plots.highway": ["gradient_heatmaps", "loss_vs_depth", "ratio_vs_depth", "real_gradients"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    loaded = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} lost {missing}"


def _code_of_notebooks() -> str:
    cells = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells += ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
    return "\n".join(cells)


def _manual() -> str:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ has no pages"
    return "\n".join(page.read_text() for page in pages)


def test_every_streamlens_import_in_readme_docs_and_notebooks_resolves():
    """Each `from streamlens... import ...` / `import streamlens...` line in the README, docs/ and notebooks works."""
    text = (ROOT / "README.md").read_text() + "\n" + _manual() + "\n" + _code_of_notebooks()
    lines = sorted({line.strip() for line in text.splitlines()
                    if re.match(r"\s*(from streamlens[\w.]* import [\w, ]+|import streamlens[\w.]*( as \w+)?)\s*(#.*)?$",
                                line)})
    assert lines, "no streamlens imports found: the pattern is wrong"
    for line in lines:
        exec(line.split("#")[0], {})  # noqa: S102 - our own README, docs and notebooks


def test_subpackages_are_attributes_and_import_stays_light():
    """`sl.ablation`, `sl.importance`, ... resolve on first use, and `import streamlens` alone loads no torch."""
    import subprocess
    import sys

    code = ("import sys, streamlens as sl; light = 'torch' not in sys.modules; "
            "names = [m for m in sl._MODULES if not hasattr(sl, m)]; "
            "print(light, names, sl.ablation.sweep.__module__, sl.importance.layer_study.__module__, "
            "sl.identity.token_identity.__module__, sl.layers is sl.importance)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "[]", "streamlens.ablation.sweeps", "streamlens.importance.study",
                   "streamlens.identity.measure", "True"], out
    with pytest.raises(AttributeError, match="no attribute 'ablations'"):
        importlib.import_module("streamlens").ablations
