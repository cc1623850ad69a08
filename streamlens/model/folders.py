"""What a local model folder may hold: no code, no pickles (checked before transformers reads it).

A folder is data, never code: streamlens loads with `trust_remote_code=False`, refuses a config that
names its own classes (`auto_map`, which would make transformers run the folder's .py files), and
loads weights only from safetensors (pickle checkpoints can run code when unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


class UntrustedFolderError(ValueError):
    """A model folder that streamlens will not load (custom code, pickle-only weights, a broken config)."""


def check_folder(folder: Path) -> None:
    """Refuse a folder that would run its own code or holds only pickle checkpoints; name what is wrong."""
    if not (folder / "config.json").is_file():
        raise UntrustedFolderError(f"{folder} is not a model folder: it has no config.json")
    for name in _CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UntrustedFolderError(f"{path} is not readable JSON ({error}): the model folder is broken") from None
        if not isinstance(config, dict):
            raise UntrustedFolderError(f"{path} is not a JSON object: the model folder is broken")
        if "auto_map" in config:
            raise UntrustedFolderError(
                f"{path} has an auto_map: the folder asks to run its own Python code, which streamlens never "
                f"does (trust_remote_code=False). Use a model whose architecture transformers ships.")
    weights = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        found = f"only pickle checkpoints ({', '.join(pickles)})" if pickles else "no weights"
        raise UntrustedFolderError(
            f"{folder} holds {found}: streamlens loads safetensors or GGUF only (pickles can run code); "
            f"convert it with safetensors, or pass a .gguf file")


def read_dtype(source: Path | str, dtype: str) -> str:
    """The dtype transformers reads `source` in before the cast to `dtype`: "float32", except a float64
    load of a folder that stores float64 weights ("float64": float32 would round them)."""
    return "float64" if dtype == "float64" and stores_float64(source) else "float32"


def stores_float64(source: Path | str) -> bool:
    """Whether a local folder's safetensors files hold any float64 weight (read from their headers only).

    Models are read in float32 and cast to the asked dtype; a float64 checkpoint (a float64 model
    healed or trained and saved) must be read in float64, or its weights lose their last bits.
    A hub name or a damaged header: False (the load itself reports the damage).
    """
    folder = Path(source)
    if not folder.is_dir():
        return False
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size <= 100_000_000 else {}
        except (OSError, ValueError):
            continue
        if any(isinstance(entry, dict) and entry.get("dtype") == "F64" for entry in header.values()):
            return True
    return False
