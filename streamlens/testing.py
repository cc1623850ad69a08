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
    same arguments and `overrides`) as a float32 GGUF file, as llama.cpp's converter would
    (`streamlens.model.gguf.write_gguf`), with a `gpt2`-style BPE vocabulary of TINY_VOCAB tokens.
    """
    import gguf

    from streamlens.model.gguf import GGUFVocabulary, write_gguf

    if arch == "mistral":
        raise ValueError("tiny_gguf_file does not write mistral: llama.cpp stores it as llama (use arch llama)")
    model = tiny_hf_model(arch, n_layers, d_model, n_heads, seed, **overrides)
    # a byte-level BPE vocabulary of TINY_VOCAB tokens (letters, digits and one merge, "a b" -> "ab")
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words = (["<unk>", "<bos>", "<eos>"] + characters + [str(d) for d in range(10)])[: TINY_VOCAB - 1] + ["ab"]
    types = [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (TINY_VOCAB - 3)
    vocabulary = GGUFVocabulary(tuple(words), tuple(types), ("a b",), 1, 2)
    return write_gguf(model, path, vocabulary, name=f"tiny-{arch}")
