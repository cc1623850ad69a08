"""streamlens: measure the Transformer residual stream.

    import streamlens as sl
    model = sl.load_model()                      # embedded SmolLM2-135M
    writes = sl.record(model, model.to_tokens("The capital of France is"))
    parts = sl.decompose(model, "The capital of France is", target=" Paris")

Submodules are imported on first use, so `streamlens --help` stays fast.
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'streamlens' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
