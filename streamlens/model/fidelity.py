"""Fidelity at load: exact float64 norms, and the bridge checked against the HF model it wraps.

The bridge re-implements each family's forward and bridges have had silent bugs, so every load runs
one short forward of fixed probe tokens through the HF model itself (before the bridge wraps it) and
through the bridge, and compares the logits relative to the logit scale (max |HF logit|). It also
checks that the logits are the linear read-out of the final stream (`final_norm(x) @ W_U + b_U`),
which every decomposition, lens and ablation score assumes: final logit soft-capping breaks it.

A float64 model should be float64 throughout, but HF rounds three things through float32: its
RMSNorms (Llama-style `w * x / rms`, Gemma-style `(1 + w) * x / rms`), Gemma's embedding scale
(a float32 buffer) and its eager attention softmax (`softmax(..., dtype=float32)`). Left alone they
make the bridge differ from HF by ~1e-8 wherever one side re-implements the step (transformer-lens's
fused-QKV attention computes its softmax in float64), and a decomposition miss its own logit by as
much. `exact_float64_norms` fixes the first two on the HF modules; `float64_softmax` the third, for
the duration of a forward (the `Model` handle runs every float64 forward inside it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional

# Largest bridge-vs-HF logit difference, relative to the logit scale, that still counts as the same
# function. float32 / bfloat16: the bridge's and HF's kernels may sum in different orders.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2}
N_PROBE = 8


def probe_tokens(d_vocab: int) -> torch.Tensor:
    """Fixed token ids [1, N_PROBE] spread over the vocabulary (no tokenizer involved)."""
    return (torch.arange(N_PROBE, dtype=torch.long) * 7919 + 3) % d_vocab


def exact_float64_norms(hf_model: torch.nn.Module) -> list[str]:
    """Make a float64 HF model float64 throughout; returns the patched modules' names.

    - every RMSNorm gets a float64 forward, but only when a probe shows that it computes
      `w * x / rms` or `(1 + w) * x / rms` (to float32 rounding); anything else is left alone (the
      fidelity check would then show it);
    - scaled embeddings (Gemma: x sqrt(d_model)) keep their scale as a float32 buffer; it is
      reset from the exact Python float.
    Attention softmax, which HF's eager attention also rounds through float32, is made exact per
    forward by `float64_softmax`.
    """
    patched = []
    for name, module in hf_model.named_modules():
        scale = getattr(module, "scalar_embed_scale", None)
        if isinstance(scale, float) and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            with torch.no_grad():
                module.embed_scale.fill_(scale)
            patched.append(name)
        weight = getattr(module, "weight", None)
        if "RMSNorm" not in type(module).__name__ or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(eps, float):
            continue
        offset = _weight_offset(module, weight, eps)
        if offset is None:
            continue
        module.forward = _rmsnorm_forward(module, eps, offset)
        patched.append(name)
    return patched


@contextlib.contextmanager
def float64_softmax() -> Iterator[None]:
    """Inside the block, `softmax(x, dtype=float32)` of a float64 `x` stays float64.

    HF's eager attention computes `softmax(scores, dtype=torch.float32).to(query.dtype)`, which
    rounds a float64 model's attention pattern to float32; the Model handle runs every forward of a
    float64 model inside this block (transformer-lens's own attention already computes in float64).
    """
    original = functional.softmax

    def softmax(input: torch.Tensor, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> torch.Tensor:
        if dtype is not None and input.dtype == torch.float64:
            dtype = None
        return original(input, dim, _stacklevel, dtype=dtype)

    functional.softmax = softmax
    try:
        yield
    finally:
        functional.softmax = original


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _weight_offset(module: torch.nn.Module, weight: torch.Tensor, eps: float) -> float | None:
    """0.0 when the norm computes w * x / rms, 1.0 for (1 + w) * x / rms, None for neither."""
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        out = module(probe)
        for offset in (0.0, 1.0):
            expected = (offset + weight) * _rms(probe, eps)
            if (out - expected).abs().max() <= 1e-5 * (1.0 + expected.abs().max()):
                return offset
    return None


def _rmsnorm_forward(module: torch.nn.Module, eps: float, offset: float):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = module.weight + offset if offset else module.weight
        return weight * _rms(hidden_states, eps)

    return forward


def logit_softcap(hf_model: torch.nn.Module) -> float | None:
    """The final logit soft-cap of the model (Gemma 2: 30.0), or None."""
    config = getattr(hf_model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        cap = getattr(source, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def relative_difference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """max |logits - reference| / max |reference| (the logit scale)."""
    scale = float(reference.abs().max()) or 1.0
    return float((logits.to(reference.dtype) - reference).abs().max()) / scale


def hf_logits(hf_model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's own logits [batch, pos, vocab] (run before the bridge wraps its modules)."""
    with torch.no_grad():
        return hf_model(tokens.to(hf_model.device)).logits.detach().clone()


def causal_leak(hf_model: Any, tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """How much the logits before the last position move when the last token changes (0 for a causal LM).

    Args:
        tokens: probe token ids [1, pos]; reference: the HF logits on them [1, pos, vocab].
    Returns:
        max |logits[:, :-1] changed - logits[:, :-1]| relative to the logit scale; an encoder (BERT, whose
        every position reads every other) moves them by O(1).
    """
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % hf_model.config.get_text_config().vocab_size
    return relative_difference(hf_logits(hf_model, changed)[:, :-1], reference[:, :-1])
