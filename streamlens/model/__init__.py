"""The boundary: the only package that touches transformer-lens and Hugging Face.

`load_model` (loading.py) turns a name, a folder or a GGUF file into a `Model` (handle.py), one
handle the rest of streamlens uses; nothing else in streamlens imports transformer-lens or HF.
"""

from streamlens.model.handle import DTYPES, Hook, Model, ModelInfo
from streamlens.model.loading import (
    CHECKED_FAMILIES,
    DEFAULT_MODEL,
    ModelFidelityError,
    ModelLoadError,
    cache_dir,
    default_model_path,
    file_hash,
    load_model,
)

__all__ = ["CHECKED_FAMILIES", "DEFAULT_MODEL", "DTYPES", "Hook", "Model", "ModelFidelityError", "ModelInfo",
           "ModelLoadError", "cache_dir",
           "default_model_path", "file_hash", "load_model"]
