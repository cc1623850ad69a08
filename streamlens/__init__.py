"""streamlens: measure the Transformer residual stream.

    import streamlens as sl
    model = sl.load_model()                      # embedded SmolLM2-135M
    writes = sl.record(model, model.to_tokens("The capital of France is"))
    parts = sl.decompose(model, "The capital of France is", target=" Paris")

Submodules and subpackages are imported on first use (`sl.ablation.sweep`, `sl.importance.layer_study`,
`sl.identity.token_identity`, ...), so `import streamlens` loads no torch and `streamlens --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "streamlens.model",
    "Model": "streamlens.model",
    "ModelLoadError": "streamlens.model",
    "Site": "streamlens.sites",
    "record": "streamlens.recording",
    "decompose": "streamlens.decomposition",
    "logit_lens": "streamlens.decomposition",
    "StreamWrites": "streamlens.results",
    "LogitDecomposition": "streamlens.results",
    "LogitLens": "streamlens.results",
    "Provenance": "streamlens.results",
}

# The modules and subpackages, one word each: `sl.ablation` is `streamlens.ablation`, imported when first used.
_MODULES = ("ablation", "data", "decomposition", "exactness", "files", "highway", "identity", "importance", "metrics",
            "model", "pages", "plots", "recording", "results", "sites", "sources", "testing", "tunedlens")
_RENAMED = {"layers": "importance"}  # the old name of the layer study, so code written before the rename still runs


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES or name in _RENAMED:
        return importlib.import_module(f"streamlens.{_RENAMED.get(name, name)}")
    raise AttributeError(f"module 'streamlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_MODULES})


__all__ = sorted(_EXPORTS)
