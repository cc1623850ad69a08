"""The `Model` handle: the residual-stream view of a loaded network (part of the boundary package).

Everything the analyses need from the network (weights of the unembedding and the final norm,
per-head output weights, a hooked forward that can start at any layer) is a method here, so a quirk
of the bridge or of HF is fixed in one place.

Quirks handled here (each has a test):
- `start_at_layer` in the bridge still runs the blocks before it, so `run(start_at_layer=k)` skips
  them itself;
- the bridge's stacked `W_O` is rebuilt on every access, so `W_O(layer)` reads one layer;
- the bridge lists `hook_pos_embed` for rotary models too, where it never fires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from streamlens import sites
from streamlens.model.fidelity import float64_softmax

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

Hook = tuple[str, Callable[..., Any]]


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
    family: str = ""
    logit_softcap: float | None = None
    """Final logit soft-cap c (logits = c tanh(pre-cap / c)); None for linear read-outs."""
    """The HF `model_type` (llama, gemma2, gpt_neox, ...)."""
    bridge_vs_hf: float = 0.0
    """max |bridge logits - HF logits| / max |HF logits| on the probe tokens, measured at load."""
    readout_error: float = 0.0
    """max |final_norm(final stream) @ W_U + b_U - logits| / max |logits|: 0 up to rounding unless the
    logits are not linear in the stream (final soft-capping)."""
    fidelity: str = ""
    """Empty when both differences are within the dtype's tolerance; otherwise what is not exact
    (loaded with strict=False). Copied into every result's provenance."""


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
        return DTYPES[self.info.dtype]

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def has_pos_embed(self) -> bool:
        # the bridge lists an alias `hook_pos_embed` even for rotary models, where it never fires
        return hasattr(self._bridge, "pos_embed") and sites.POS_EMBED in self._bridge.hook_dict

    @property
    def norm_kind(self) -> str:
        """The norms in words: 'RMSNorm', 'RMSNorm (1 + w)' or 'LayerNorm', plus ', post-norms' when
        the attention output is normalised before it enters the stream."""
        kind = "LayerNorm" if self.info.norm == "layernorm" else "RMSNorm"
        if getattr(self._bridge.ln_final, "uses_weight_offset", False):
            kind += " (1 + w)"
        if self.attn_post_norm(0) is not None:
            kind += ", post-norms"
        return kind

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
    def W_E(self) -> torch.Tensor:
        """Token embedding matrix, shape [d_vocab, d_model]."""
        return self._bridge.W_E

    def values_per_head(self, v: torch.Tensor) -> torch.Tensor:
        """The value vectors each query head reads, [..., kv_head, d_head] -> [..., head, d_head].

        With grouped-query attention (HF `repeat_kv`) query head h reads kv head h // (n_heads // n_kv_heads).
        """
        groups = self.n_heads // v.shape[-2]
        return v if groups == 1 else v.repeat_interleave(groups, dim=-2)

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

    def attn_post_norm(self, layer: int) -> torch.Tensor | None:
        """Weight [d_model] of the RMSNorm between the attention output and the stream, Gemma's
        (1 + w) offset added; None for models without one.

        In sandwich / post-norm models (Gemma 2, Gemma 3, OLMo 2) the attention write is this norm's
        output: `write = w * (sum_h z_h @ W_O[h] + b_O) / scale`, with `scale` at
        `sites.attn_post_scale(layer)`; with the clean scale frozen, head h writes
        `w * (z_h @ W_O[h]) / scale`.
        """
        ln = self._bridge.blocks[self.check_layer(layer)]._modules.get("ln1_post")
        if ln is None:
            return None
        if not getattr(ln, "uses_rms_norm", True):
            raise ValueError(f"layer {layer}: the attention post-norm is a LayerNorm; per-head writes through it "
                             f"are not supported (only RMSNorm post-norms are)")
        weight = ln.original_component.weight
        return (1.0 + weight) if getattr(ln, "uses_weight_offset", False) else weight

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
        return self.final_norm(stream) @ self.W_U + self.b_U

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
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0 or tokens.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):  # bool is not a token id
            what = f"shape {tuple(tokens.shape)} of {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a non-empty [batch, pos] integer tensor, got {what}")
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
        if isinstance(token, bool) or (hasattr(token, "dtype") and str(token.dtype) in ("bool", "torch.bool")):
            raise ValueError(f"target {token!r} is a bool: give a token id (0-{self.info.d_vocab - 1}) or its text")
        if not isinstance(token, (str, int)) and hasattr(token, "__index__") and getattr(token, "ndim", 0) == 0:
            token = int(token.__index__())  # numpy and torch integer scalars are ids too
        if isinstance(token, int):
            if not 0 <= token < self.info.d_vocab:
                raise ValueError(f"token id {token} out of range: vocabulary is 0-{self.info.d_vocab - 1}")
            return token
        if not isinstance(token, str):
            raise ValueError(f"target {token!r} is a {type(token).__name__}: give a token id (0-"
                             f"{self.info.d_vocab - 1}) or its text, e.g. ' Paris'")
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
        """Forward pass returning logits [batch, pos, d_vocab] (`run_to` with no stop)."""
        return self.run_to(tokens_or_resid, None, hooks, start_at_layer)

    def run_to(
        self,
        tokens_or_resid: torch.Tensor,
        stop_at: str | None = None,
        hooks: Sequence[Hook] = (),
        start_at_layer: int | None = None,
    ) -> torch.Tensor:
        """The one partial forward: start at a layer, stop at a hook point.

        Args:
            tokens_or_resid: token ids [batch, pos], or, with `start_at_layer=k`, the stream
                entering block k (`resid_pre k`) [batch, pos, d_model].
            stop_at: a hook name; the forward ends as soon as it fires, after the `hooks` on it ran,
                and the (possibly hooked) tensor there is returned. None: run to the logits.
            hooks: forward hooks `(hook_name, fn(tensor, hook) -> tensor | None)`, attached only for
                this call.
            start_at_layer: skip the embedding and the blocks before k (they are not computed).

        Returns:
            the tensor at `stop_at` (e.g. `sites.FINAL_STREAM`: [batch, pos, d_model]), or the logits
            [batch, pos, d_vocab] when `stop_at` is None.
        """
        reached: dict[str, torch.Tensor] = {}
        stops: list[Hook] = []
        if stop_at is not None:
            if stop_at not in self._bridge.hook_dict:
                raise ValueError(f"unknown hook point {stop_at!r} for this model")

            def stop(tensor: torch.Tensor, hook: Any) -> None:
                reached[stop_at] = tensor
                raise _Reached

            stops.append((stop_at, stop))
        with self.hooks([*hooks, *stops]), self.exact(), contextlib.suppress(_Reached):
            if start_at_layer is None:
                logits = self._bridge(self.check_tokens(tokens_or_resid))
            else:
                self.check_layer(start_at_layer)
                with _skipping_blocks(self._bridge.blocks[:start_at_layer]):
                    logits = self._bridge(tokens_or_resid, start_at_layer=start_at_layer)
        if stop_at is None:
            return logits
        if stop_at not in reached:
            raise RuntimeError(f"hook point {stop_at!r} did not fire in this forward (is it before start_at_layer?)")
        return reached[stop_at]

    def run_with_cache(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full transformer-lens cache (every hook point); the heavy baseline `record` avoids."""
        with self.exact():
            logits, cache = self._bridge.run_with_cache(self.check_tokens(tokens))
        return logits, dict(cache.items())

    def exact(self) -> contextlib.AbstractContextManager[None]:
        """The block every forward runs in: float64 models keep their attention softmax float64
        (HF's eager attention would round it through float32)."""
        return float64_softmax() if self.info.dtype == "float64" else contextlib.nullcontext()

    def has_hooks(self) -> bool:
        """True when any hook is attached anywhere (used by tests that check restoration)."""
        return any(hp.fwd_hooks or hp.bwd_hooks for hp in self._bridge.hook_dict.values())

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self._bridge.parameters()


class _Reached(Exception):
    """Raised by the stop hook of `run_to` to end a forward at its hook point."""


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
