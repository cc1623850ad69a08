"""Write an HF causal LM as a float32 GGUF file, as llama.cpp's converter would (part of the boundary package).

llama.cpp tensor names (`token_embd`, `blk.N.attn_q`, ...) come from transformers' own GGUF name map
(`get_gguf_hf_weights_map`), `<arch>.*` metadata from its GGUF -> config map, and the inverse of
each family's transformers GGUF tensor processing is applied: Llama's rotary q/k permutation,
GPT-2's transposed projections, Gemma 2/3 norm weights stored as 1 + w. The vocabulary is a
`GGUFVocabulary` (a byte-level BPE: tokens, types, merges), read from a fast HF tokenizer by
`bpe_vocabulary`. Used by `streamlens prune --gguf` and by `streamlens.testing.tiny_gguf_file`.

A tied model (`tie_word_embeddings`, e.g. SmolLM2) is written without `output.weight`, as llama.cpp
writes it: the reader ties the unembedding back to `token_embd` (the matrix is stored once, not twice).

What GGUF cannot say is lost on the way: config fields without a GGUF key (Gemma 3's
`layer_types`, for one) come back as transformers' defaults; the export's proof shows it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# GGUF metadata keys (as llama.cpp writes them) whose values are floats; the rest are integers.
_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
_ARCH = {"gemma3_text": "gemma3"}


@dataclass(frozen=True)
class GGUFVocabulary:
    """A byte-level BPE vocabulary as GGUF stores it (`tokenizer.ggml.*`, model "gpt2")."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]
    bos: int | None
    eos: int | None


def bpe_vocabulary(tokenizer: Any) -> GGUFVocabulary:
    """The vocabulary of a fast HF byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM2, Qwen ...).

    Raises:
        ValueError: the tokenizer is not a fast BPE tokenizer (GGUF "gpt2" model).
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer is not a fast byte-level BPE tokenizer ({model.get('type')!r}): "
                         f"its GGUF vocabulary cannot be written")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = int(gguf.TokenType.NORMAL)
    for added in state.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocabulary(tuple(tokens), tuple(types), tuple(merges), tokenizer.bos_token_id, tokenizer.eos_token_id)


def check_gguf_export(source: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a model whose family transformers cannot read from GGUF or whose tokenizer
    is not a byte-level BPE (ValueError naming why)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    family = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type
    if _ARCH.get(family, family) not in GGUF_TO_TRANSFORMERS_MAPPING["config"]:
        raise ValueError(f"transformers reads no GGUF files of family {family!r}: drop --gguf")
    bpe_vocabulary(AutoTokenizer.from_pretrained(source, trust_remote_code=False))


def _permute(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's rotary permutation of q/k rows (transformers' `_reverse_permute_weights` undoes it)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(hf_model: torch.nn.Module, path: str | os.PathLike[str], vocabulary: GGUFVocabulary,
               name: str = "streamlens-export") -> Path:
    """Write `hf_model` as a float32 GGUF file at `path` (atomically: a temporary file, then a rename).

    Raises:
        ValueError: transformers reads no GGUF of this family, or a weight has no GGUF name.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_TO_TRANSFORMERS_MAPPING,
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    family = hf_model.config.model_type
    arch = _ARCH.get(family, family)
    config_keys = GGUF_TO_TRANSFORMERS_MAPPING["config"].get(arch)
    if config_keys is None:
        raise ValueError(f"transformers reads no GGUF files of family {family!r}: GGUF export is not possible")
    config = hf_model.config.to_dict()
    to_hf = get_gguf_hf_weights_map(hf_model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config))
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name)
        _write_config(writer, arch, config_keys, config)
        _write_vocabulary(writer, vocabulary)
        _write_tensors(writer, hf_model, arch, to_hf, config)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _write_config(writer: Any, arch: str, config_keys: dict[str, str], config: dict[str, Any]) -> None:
    for gguf_key, hf_key in config_keys.items():
        value = config.get(hf_key) if hf_key else None
        if value is None and gguf_key == "feed_forward_length":
            value = config.get("n_inner") or 4 * config.get("n_embd", config.get("hidden_size", 0))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key = f"{arch}.{gguf_key}"
            if gguf_key in _FLOAT_KEYS:
                writer.add_float32(key, float(value))
            else:
                writer.add_uint32(key, int(value))
    if "rope_theta" not in config and "rope.freq_base" in config_keys:  # transformers 5 keeps it in rope_parameters
        theta = (config.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            writer.add_float32(f"{arch}.rope.freq_base", float(theta))


def _write_vocabulary(writer: Any, vocabulary: GGUFVocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(vocabulary.tokens))
    writer.add_token_types(list(vocabulary.types))
    writer.add_token_merges(list(vocabulary.merges))
    if vocabulary.bos is not None:
        writer.add_bos_token_id(int(vocabulary.bos))
    if vocabulary.eos is not None:
        writer.add_eos_token_id(int(vocabulary.eos))


def _write_tensors(writer: Any, hf_model: torch.nn.Module, arch: str, to_hf: dict[str, str],
                   config: dict[str, Any]) -> None:
    import numpy as np

    state = hf_model.state_dict()
    tied = bool(config.get("tie_word_embeddings"))
    written = set()
    for gguf_name, hf_name in to_hf.items():
        if hf_name not in state or hf_name in written:
            continue
        if tied and gguf_name == "output.weight":
            continue  # llama.cpp's tied form: no output matrix; transformers' reader ties it back to token_embd
        weights = state[hf_name].detach().to("cpu", torch.float32).numpy()
        if arch == "gpt2" and any(part in gguf_name for part in ("attn_qkv.weight", "ffn_down.weight",
                                                                 "ffn_up.weight", "attn_output.weight")):
            weights = weights.T  # GPT-2's Conv1D stores [in, out]; llama.cpp stores [out, in]
        if arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
            weights = weights + 1  # llama.cpp stores Gemma's (1 + w)
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
            weights = _permute(weights, heads, heads if ".attn_q." in gguf_name else kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weights))
        written.add(hf_name)
    left = set(state) - written - ({"lm_head.weight"} if config.get("tie_word_embeddings") else set())
    left = {key for key in left if not key.endswith(("rotary_emb.inv_freq", "masked_bias", "attn.bias"))}
    if left:
        raise ValueError(f"no GGUF name for {sorted(left)} of {config.get('model_type')}")
