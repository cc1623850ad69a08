"""The logit lens and the tuned lens side by side on held-out tokens."""

from __future__ import annotations

import einops
import torch

from streamlens.model import Model
from streamlens.recording import record
from streamlens.results import Provenance, command_line
from streamlens.results.tunedlens import LENSES, LensComparison, TunedLens
from streamlens.tunedlens.train import kl_from_final, stages_per_pass


def check_lens(model: Model, lens: TunedLens) -> TunedLens:
    """A lens fits a model when it has one translator per layer of the model's width."""
    if lens.weight.shape[0] != model.n_layers or lens.weight.shape[-1] != model.info.d_model:
        raise ValueError(f"the lens has {lens.weight.shape[0]} translators of width {lens.weight.shape[-1]}; "
                         f"{model.info.name} needs {model.n_layers} of width {model.info.d_model}")
    if lens.provenance.weights_hash and model.info.weights_hash and lens.provenance.weights_hash != model.info.weights_hash:
        raise ValueError(f"the lens was trained on {lens.provenance.model} (weights {lens.provenance.weights_hash[:12]}), "
                         f"not on these weights ({model.info.weights_hash[:12]})")
    return lens


def compare_lenses(
    model: Model,
    tokens: torch.Tensor,
    lens: TunedLens,
    text_of: torch.Tensor | None = None,
    text: str = "",
    command: str | None = None,
    text_hashes: tuple[str, ...] = (),
) -> LensComparison:
    """KL(final || lens) and the rank of the final top token at every stage, for both lenses.

    Args:
        tokens: held-out token ids [window, pos].
        lens: a trained `TunedLens` (an `identity` lens reproduces the logit lens exactly).
        text_of: the text of each window [window] (for intervals over texts); None: one text per window.
        text_hashes: sha256 of each text read (recorded in the result; `tunedlens.texts`).
    """
    check_lens(model, lens)
    model.check_tokens(tokens)
    n_windows = tokens.shape[0]
    kls = torch.empty(2, model.n_layers + 1, *tokens.shape, dtype=torch.float64)
    ranks = torch.empty(2, model.n_layers + 1, *tokens.shape, dtype=torch.float64)
    with torch.inference_mode():
        for window in range(n_windows):  # one window at a time: [stages x pos, vocab] per group of stages
            writes = record(model, tokens[window: window + 1])
            final_logprobs = writes.logits[0].log_softmax(-1)
            final_probs = final_logprobs.exp()
            top = final_logprobs.argmax(-1, keepdim=True)
            streams = [writes.final[0] if stage == model.n_layers else writes.stream(stage - 1 if stage else None)[0]
                       for stage in range(model.n_layers + 1)]
            per_pass = stages_per_pass(tokens.shape[1])
            for first in range(0, model.n_layers + 1, per_pass):
                stages = range(first, min(first + per_pass, model.n_layers + 1))
                for index, reads in enumerate(([streams[s] for s in stages],
                                               [lens.translate(s, streams[s]) for s in stages])):
                    kl, rank = _read(model, torch.stack(reads), final_logprobs, final_probs, top)
                    kls[index, first: stages.stop, window] = kl
                    ranks[index, first: stages.stop, window] = rank
    return LensComparison(
        provenance=Provenance.of(model, command or command_line(), lens.seed),
        lenses=LENSES, layer_labels=("embed", *(str(layer) for layer in range(model.n_layers))),
        kl=kls, rank=ranks, text_of=(torch.arange(n_windows) if text_of is None else text_of.cpu()), text=text,
        text_hashes=tuple(text_hashes),
    )


def _read(model: Model, reads: torch.Tensor, final_logprobs: torch.Tensor, final_probs: torch.Tensor,
          top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(final || read) and the rank of the final top token, each [stage, pos] (float64, CPU), for the
    streams reads [stage, pos, d_model] read through the final norm and unembedding (one matmul for all
    stages: each row's numbers are those of its stage read alone)."""
    n_stages = reads.shape[0]
    flat = einops.rearrange(reads, "stage pos d_model -> (stage pos) d_model")
    logprobs = einops.rearrange(model.final_logits(flat).log_softmax(-1), "(stage pos) vocab -> stage pos vocab",
                                stage=n_stages)
    kl = kl_from_final(final_logprobs, logprobs, final_probs)
    own = logprobs.gather(-1, einops.repeat(top, "pos one -> stage pos one", stage=n_stages))
    rank = (logprobs > own).sum(-1)
    return kl.double().cpu(), rank.double().cpu()
