"""Tiny random models for tests and examples: built locally, no download.

`tiny_model_folder` writes an HF folder (config, safetensors weights, a word-level tokenizer) for a
tiny network of any family in `FAMILIES` (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
olmo2, phi, phi3, gpt2, gpt_neox, opt). Norm weights and biases are randomised so that a
decomposition that forgets a term fails. Each family keeps what makes it different: biases, (1 + w)
RMSNorm, sandwich and post norms, q/k norms, scaled and tied embeddings, parallel attention + MLP,
sliding-window layers (window 4, shorter than the test prompts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 64
SLIDING_WINDOW = 4  # shorter than the 9-token test prompts, so the window really masks


def _family_configs(d_model: int, n_layers: int, n_heads: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """family -> (transformers config class, model class, config kwargs)."""
    d_head = d_model // n_heads
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    rotary = dict(common, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=128)
    gemma = dict(rotary, head_dim=d_head, query_pre_attn_scalar=d_head, tie_word_embeddings=True)
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rotary, tie_word_embeddings=False)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(rotary, sliding_window=SLIDING_WINDOW)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rotary, tie_word_embeddings=True)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rotary, head_dim=d_head, attention_bias=True)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(gemma)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(gemma, sliding_window=SLIDING_WINDOW, final_logit_softcapping=None)),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                        dict(gemma, sliding_window=SLIDING_WINDOW,
                             layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(n_layers)])),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(rotary, tie_word_embeddings=False)),
        "phi": ("PhiConfig", "PhiForCausalLM",
                dict(common, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, max_position_embeddings=128, partial_rotary_factor=0.5)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rotary)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(common, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=128)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(common, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                          num_attention_heads=n_heads, max_position_embeddings=128, rotary_pct=0.5,
                          use_parallel_residual=True, tie_word_embeddings=False)),
        "opt": ("OPTConfig", "OPTForCausalLM",
                dict(common, hidden_size=d_model, ffn_dim=2 * d_model, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, max_position_embeddings=128, word_embed_proj_dim=d_model,
                     do_layer_norm_before=True)),
    }


FAMILIES: tuple[str, ...] = tuple(_family_configs(32, 3, 4))


def tiny_tokenizer_words(vocab: int = TINY_VOCAB) -> list[str]:
    """The tokenizer's words: id i is the word f"w{i}" (ids 0-2 are <unk>, <bos>, <eos>)."""
    return ["<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, vocab)]


def tiny_hf_model(
    arch: str = "llama",
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> torch.nn.Module:
    """A tiny random HF causal LM of one family (float32, eval mode), with random norm weights and biases.

    `overrides` change config fields (e.g. `final_logit_softcapping=30.0`).
    """
    import transformers

    configs = _family_configs(d_model, n_layers, n_heads)
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}: choose from {', '.join(configs)}")
    config_name, model_name, kwargs = configs[arch]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                parameter.copy_(1.0 + 0.5 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.2 * torch.randn_like(parameter))
    return model.eval()


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over `tiny_tokenizer_words()`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(tiny_tokenizer_words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )


def tiny_model_folder(
    folder: str | Path,
    arch: str = "llama",
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a tiny random causal LM of family `arch` (see `FAMILIES`) to `folder` and return the folder."""
    folder = Path(folder)
    model = tiny_hf_model(arch, n_layers, d_model, n_heads, seed, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# GGUF metadata keys (as llama.cpp writes them) whose values are floats; the rest are integers.
_GGUF_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")


def tiny_gguf_file(
    path: str | Path,
    arch: str = "qwen2",
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write the tiny random model of family `arch` (the same weights as `tiny_model_folder` with the
    same arguments and `overrides`) as a float32 GGUF file, as llama.cpp's converter would: llama.cpp tensor names
    (`token_embd`, `blk.N.attn_q`, ...), `<arch>.*` metadata, a `gpt2`-style BPE vocabulary.

    The inverse of each family's transformers GGUF tensor processing is applied (GPT-2's transposed
    projections, Gemma's norm weights stored as 1 + w); Llama's rotary q/k permutation is not
    written (use another family).
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_TO_TRANSFORMERS_MAPPING,
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    if arch in ("llama", "mistral"):
        raise ValueError(f"tiny_gguf_file does not write {arch}: its q/k rotary permutation is not implemented")
    model = tiny_hf_model(arch, n_layers, d_model, n_heads, seed, **overrides)
    gguf_arch = {"gemma3_text": "gemma3"}.get(arch, arch)
    config_keys = GGUF_TO_TRANSFORMERS_MAPPING["config"].get(gguf_arch)
    if config_keys is None:
        raise ValueError(f"transformers reads no GGUF files of family {arch!r}")
    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config)
    to_hf = get_gguf_hf_weights_map(model, processor)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(f"tiny-{arch}")
    _gguf_config(writer, arch, gguf_arch, config_keys, config, d_model)
    _gguf_vocabulary(writer)
    _gguf_tensors(writer, arch, gguf_arch, model.state_dict(), to_hf, bool(config.get("tie_word_embeddings")))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_config(writer: Any, arch: str, gguf_arch: str, config_keys: dict[str, str | None], config: dict[str, Any],
                 d_model: int) -> None:
    """The `<arch>.*` metadata llama.cpp writes: each config number under its GGUF key."""
    for gguf_key, hf_key in config_keys.items():
        value = config.get(hf_key) if hf_key else None
        if value is None and gguf_key == "feed_forward_length":
            value = config.get("n_inner") or 4 * d_model
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key = f"{gguf_arch}.{gguf_key}"
            if gguf_key in _GGUF_FLOAT_KEYS:
                writer.add_float32(key, float(value))
            else:
                writer.add_uint32(key, int(value))
    if arch in ("qwen2", "qwen3", "phi3") and "rope_theta" not in config:
        writer.add_float32(f"{gguf_arch}.rope.freq_base", float(config.get("rope_parameters", {}).get("rope_theta", 1e4)))


def _gguf_vocabulary(writer: Any) -> None:
    """A byte-level BPE vocabulary of TINY_VOCAB tokens (letters, digits and one merge, "a b" -> "ab")."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words = (["<unk>", "<bos>", "<eos>"] + characters + [str(d) for d in range(10)])[: TINY_VOCAB - 1] + ["ab"]
    writer.add_token_list(words)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (TINY_VOCAB - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _gguf_tensors(writer: Any, arch: str, gguf_arch: str, state: dict[str, torch.Tensor], to_hf: dict[str, str],
                  tied: bool) -> None:
    """Every weight under its llama.cpp name, stored as llama.cpp stores it; fails on a weight left unnamed."""
    import numpy as np

    written = set()
    for gguf_name, hf_name in to_hf.items():
        if hf_name not in state or hf_name in written:
            continue
        weights = state[hf_name].detach().to(torch.float32).numpy()
        if gguf_arch == "gpt2" and any(part in gguf_name for part in ("attn_qkv.weight", "ffn_down.weight",
                                                                      "ffn_up.weight", "attn_output.weight")):
            weights = weights.T  # GPT-2's Conv1D stores [in, out]; llama.cpp stores [out, in]
        if gguf_arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
            weights = weights + 1  # llama.cpp stores Gemma's (1 + w)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weights))
        written.add(hf_name)
    missing = sorted(set(state) - written - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"no GGUF name for {missing} of {arch}")
