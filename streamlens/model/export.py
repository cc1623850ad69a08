"""Export a pruned model: the chosen blocks deleted from a Hugging Face model, saved as a real HF folder.

`drop_blocks` builds a new model of the same class from a config with fewer layers and loads the
kept blocks' weights renumbered 0 .. L-k-1, so every `layer_idx` (the KV cache's index) is the new
one and the source model is untouched. Per-layer config lists (`layer_types` of Gemma 3 / Qwen 3 /
Mistral-style sliding windows, any list with one entry per layer) are pruned in step; a config that
cannot express the removal (per-layer index lists, attention scaled by the layer index, a
multimodal wrapper) is refused with the reason (`ExportRefused`).

`save_folder` writes config, renumbered safetensors, tokenizer and generation config into a
temporary folder beside the target and renames it into place: an interrupted export leaves nothing
under the target's name. `folder_logits` loads an exported folder fresh with transformers (float64:
exact norms and softmax, as `load_model` does), for the export's proof (`streamlens.prune.prove`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from streamlens.model import fidelity as F
from streamlens.model.handle import DTYPES

# config keys that name layers by index (not one entry per layer): deleting blocks would need them
# remapped, and a wrong remap changes the model silently, so these configs are refused
_INDEX_LISTS = ("mlp_only_layers", "no_rope_layer_indices", "full_attn_idxs", "global_attn_layers")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# lists that may happen to have one entry per layer but are not per-layer settings
_NOT_PER_LAYER = ("architectures", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens")


class ExportRefused(ValueError):
    """A removal the model's config cannot express (the message says why)."""


def layer_count(config: Any) -> int:
    """Blocks of an HF config (num_hidden_layers, or GPT-2's n_layer)."""
    for key in _LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ExportRefused(f"{type(config).__name__} has no layer count ({', '.join(_LAYER_COUNT_KEYS)})")


def check_removal(config: Any, blocks: Sequence[int]) -> tuple[int, ...]:
    """The sorted blocks to delete, or `ExportRefused`/`ValueError` naming why the config cannot lose them."""
    n_layers = layer_count(config)
    chosen = tuple(sorted(set(int(b) for b in blocks)))
    if len(chosen) != len(blocks):
        raise ValueError(f"blocks {list(blocks)} name a block twice")
    bad = [b for b in chosen if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"block {bad[0]} out of range: model has {n_layers} blocks (0-{n_layers - 1})")
    if len(chosen) >= n_layers:
        raise ValueError(f"cannot remove {len(chosen)} of {n_layers} blocks: at least one must stay "
                         f"(remove 1-{n_layers - 1})")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        raise ExportRefused(f"{type(config).__name__} wraps a text model in a multimodal config: export of "
                            f"such configs is not supported")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ExportRefused("the config scales attention by 1 / (layer index + 1) (scale_attn_by_inverse_layer_idx):"
                            " renumbered blocks would compute something else")
    for key in _INDEX_LISTS:
        if getattr(config, key, None):
            raise ExportRefused(f"the config names layers by index in {key!r}: streamlens does not remap such lists")
    return chosen


def pruned_config(config: Any, blocks: Sequence[int]) -> Any:
    """A copy of `config` with `blocks` deleted: fewer layers, every per-layer list pruned in step."""
    chosen = check_removal(config, blocks)
    n_layers = layer_count(config)
    keep = [layer for layer in range(n_layers) if layer not in chosen]
    new = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n_layers and key not in _NOT_PER_LAYER \
                and not key.endswith("token_id"):
            setattr(new, key, [value[layer] for layer in keep])
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int) and key in config.to_dict():
            setattr(new, key, len(keep))
    if layer_count(new) != len(keep):
        new.num_hidden_layers = len(keep)
    return new


def _layer_list(hf_model: torch.nn.Module, n_layers: int) -> str:
    """The dotted name of the ModuleList holding the blocks (model.layers, transformer.h, ...)."""
    found = [name for name, module in hf_model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name]
    if len(found) != 1:
        raise ExportRefused(f"cannot tell which module list holds the {n_layers} blocks (found {found or 'none'})")
    return found[0]


def drop_blocks(hf_model: torch.nn.Module, blocks: Sequence[int]) -> torch.nn.Module:
    """A new HF model of the same class with `blocks` deleted; `hf_model` is left untouched.

    The new model is built from `pruned_config` (so `layer_idx` of every attention is the new
    index) and loads the kept blocks' weights renumbered: old block keep[i] becomes block i. Every
    weight is copied (strict load: a weight left over or missing is an error).

    Returns:
        the pruned model, same dtype and device as `hf_model`, in eval mode.
    """
    config = hf_model.config
    chosen = check_removal(config, blocks)
    n_layers = layer_count(config)
    keep = [layer for layer in range(n_layers) if layer not in chosen]
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = _layer_list(hf_model, n_layers)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for name, tensor in hf_model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor.detach().clone()
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor.detach().clone()
    parameter = next(hf_model.parameters())
    pruned = type(hf_model)(pruned_config(config, chosen)).to(dtype=parameter.dtype, device=parameter.device)
    pruned.load_state_dict(state, strict=True)
    if getattr(hf_model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(hf_model.generation_config)
    return pruned.eval()


def save_folder(hf_model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike[str],
                facts: dict[str, Any] | None = None, gguf_name: str | None = None) -> Path:
    """Save `hf_model` (safetensors), its tokenizer and generation config as an HF folder, atomically.

    Everything is written into `<folder>.tmp-<pid>-<hex>` beside `folder`, then renamed into place;
    a failure or an interrupt removes the temporary folder. `facts` (what was removed, from which
    model) is written as `streamlens-export.json` beside the weights; `gguf_name` adds a float32
    GGUF file of that name (`gguf.write_gguf`, the tokenizer's byte-level BPE vocabulary).

    Raises:
        ValueError: `folder` exists and is not an empty folder.
    """
    target = Path(folder).expanduser()
    check_export_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise in a CLI
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if gguf_name is not None:
            from streamlens.model.gguf import bpe_vocabulary, write_gguf

            write_gguf(hf_model, tmp / gguf_name, bpe_vocabulary(tokenizer), name=target.name)
        if facts is not None:
            (tmp / "streamlens-export.json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
        from streamlens.files import umask

        for path in tmp.iterdir():  # save_pretrained writes some files private; outputs follow the umask
            os.chmod(path, 0o666 & ~umask())
        os.chmod(tmp, 0o777 & ~umask())
        try:
            if target.is_dir():
                target.rmdir()  # empty (checked above): rename needs the name free
            tmp.rename(target)
        except OSError:  # another run filled the folder since the check
            raise ValueError(f"export folder {target} exists and is not empty (written by another run meanwhile): "
                             f"give a new or empty folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


GGUF_NAME = "model-f32.gguf"  # the float32 GGUF file `streamlens prune --gguf` writes into a model folder
LOGIT_TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2}  # relative; what a faithful save keeps


def gguf_tolerance(dtype: str) -> float:
    """What a float32 GGUF file of a `dtype` model may differ by (relative): float32's tolerance at best."""
    return max(LOGIT_TOLERANCE[dtype], LOGIT_TOLERANCE["float32"])


def relative_difference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """max |logits - reference| / max |reference| (in float64), over every position and vocabulary entry."""
    return float((logits.double() - reference.double()).abs().max() / reference.double().abs().max())


def check_export_folder(folder: str | os.PathLike[str]) -> Path:
    """Refuse an export folder that exists and is not an empty folder (creating nothing)."""
    target = Path(folder).expanduser()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"export folder {target} exists and is not a folder: give a new folder name")
    if target.is_dir() and any(target.iterdir()):
        raise ValueError(f"export folder {target} exists and is not empty: give a new or empty folder")
    return target


def load_hf(source: str | os.PathLike[str], dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """(HF model, tokenizer) loaded fresh from a folder or a cached hub name: safetensors only, no remote
    code, eager attention; float64 models get exact norms (`fidelity.exact_float64_norms`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], attn_implementation="eager",
                                                    trust_remote_code=False, use_safetensors=True).eval()
    return hf_model, tokenizer


def check_exportable(source: str | os.PathLike[str]) -> None:
    """Refuse (`ExportRefused`), before any work, a model whose config cannot lose blocks at all."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    if layer_count(config) >= 2:
        check_removal(config, [0])


def folder_logits(path: str | os.PathLike[str], tokens: torch.Tensor, dtype: str = "float32",
                  batch_size: int = 4) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] of the model in an HF folder or a `.gguf` file, loaded fresh with
    transformers (no bridge), run `batch_size` windows at a time.

    float64: norms and attention softmax computed in float64 (HF rounds them through float32), as
    `load_model` does, so the comparison measures the export and not HF's rounding. A GGUF file is
    dequantised to float32 (then cast to `dtype`).
    """
    path = Path(path)
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                        attn_implementation="eager", trust_remote_code=False)
        hf_model = hf_model.to(DTYPES[dtype]).eval()
    else:
        hf_model, _ = load_hf(path, dtype)
    if dtype == "float64":
        F.exact_float64_norms(hf_model)
    device = next(hf_model.parameters()).device
    with torch.inference_mode(), F.float64_softmax() if dtype == "float64" else contextlib.nullcontext():
        return torch.cat([F.hf_logits(hf_model, tokens[start:start + batch_size].to(device))
                          for start in range(0, tokens.shape[0], batch_size)])
