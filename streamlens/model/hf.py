"""A plain Hugging Face copy of a loaded model: what generation, timing and training run on.

The `Model` handle's network is wrapped by the transformer-lens bridge (hook points around every
module, frozen parameters). Timing a model through those wrappers would time the wrappers, and
training would change the handle's own weights; so both work on a fresh `AutoModelForCausalLM`
read from the same source (the folder, the GGUF conversion or the hub name the handle was loaded
from), in the handle's dtype and on its device. The copy is checked against the handle on fixed
probe tokens: `plain_copy(model)` computes `model.run`'s logits up to the dtype's tolerance, or
raises (e.g. when the folder's weights changed after the handle was loaded).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from streamlens.model import fidelity as F
from streamlens.model.folders import check_folder, read_dtype
from streamlens.model.handle import DTYPES, Model


class PlainCopyError(ValueError):
    """The fresh HF copy does not compute the handle's logits (its source changed, or is gone)."""


def plain_copy(model: Model, trainable: bool = False) -> torch.nn.Module:
    """A fresh HF causal LM with the handle's weights [no bridge], in eval mode.

    Args:
        model: a loaded handle; its `info.source` (folder or hub name) is read again.
        trainable: leave `requires_grad` on (for training); False freezes every parameter.

    Returns:
        the HF module; `copy(tokens).logits` equals `model.run(tokens)` up to `fidelity.TOLERANCE`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    source: str | Path = model.info.source
    if Path(source).is_dir():
        check_folder(Path(source))
        source = Path(source)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[read_dtype(source, model.info.dtype)],
                                                        attn_implementation="eager",
                                                        trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError) as error:
        raise PlainCopyError(f"cannot read {model.info.name!r} again from {source}: {error}") from None
    hf_model = hf_model.to(device=model.device, dtype=DTYPES[model.info.dtype]).eval()
    if model.info.dtype == "float64":
        F.exact_float64_norms(hf_model)
    for parameter in hf_model.parameters():
        parameter.requires_grad_(trainable)
    check_same(model, hf_model)
    return hf_model


def check_same(model: Model, hf_model: torch.nn.Module) -> float:
    """max |HF logits - handle logits| / logit scale on the probe tokens; raises above the tolerance."""
    probe = F.probe_tokens(model.info.d_vocab).to(model.device)[None]
    with torch.no_grad(), hf_context(model):
        difference = F.relative_difference(hf_model(probe).logits, model.run(probe))
    tolerance = F.TOLERANCE[model.info.dtype]
    if difference > tolerance:
        raise PlainCopyError(f"the HF copy of {model.info.name!r} read from {model.info.source} differs from the "
                             f"loaded model by {difference:.2e} of the logit scale (tolerance {tolerance:.0e}): "
                             f"was the folder changed after loading?")
    return difference


def hf_context(model: Model) -> contextlib.AbstractContextManager[None]:
    """The block HF forwards of a float64 model run in (their softmax stays float64, as in `Model.run`)."""
    return F.float64_softmax() if model.info.dtype == "float64" else contextlib.nullcontext()


def parameter_count(hf_model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    seen: dict[int, int] = {}
    for parameter in hf_model.parameters():
        seen[parameter.data_ptr()] = parameter.numel()
    return sum(seen.values())


def weights_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a model's weights on disk: a `.gguf` file's size, or a folder's `*.safetensors` files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ValueError(f"model path {path} does not exist: give a model folder or a .gguf file")
    files = list(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weights: give a model folder or a .gguf file")
    return sum(file.stat().st_size for file in files)
