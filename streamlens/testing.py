"""Tiny random models for tests and examples: built locally, no download.

`tiny_model_folder` writes an HF folder (config, safetensors weights, a word-level tokenizer) for a
Llama-like (RMSNorm, rotary, no biases) or GPT-2-like (LayerNorm, learned positions, biases)
network. Norm weights and biases are randomised so that a decomposition that forgets a term fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TINY_VOCAB = 64


def tiny_tokenizer_words(vocab: int = TINY_VOCAB) -> list[str]:
    """The tokenizer's words: id i is the word f"w{i}" (ids 0-2 are <unk>, <bos>, <eos>)."""
    return ["<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, vocab)]


def tiny_model_folder(
    folder: str | Path,
    arch: Literal["llama", "gpt2"] = "llama",
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random causal LM to `folder` and return the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=TINY_VOCAB, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=128,
            bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: choose llama or gpt2")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                parameter.copy_(1.0 + 0.5 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    vocab = {word: index for index, word in enumerate(tiny_tokenizer_words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )
    tokenizer.save_pretrained(folder)
    return folder
