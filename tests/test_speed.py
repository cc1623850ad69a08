"""The faster paths of the default runs give the numbers of the plain computations they replace.

Each test recomputes one sped-up piece the obvious way (per-tensor Adam with retained stream
gradients; ranks counted on a fresh score matrix per token) and asks for the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from streamlens.data import TextWindows
from streamlens.highway import toy
from streamlens.identity import stage_features, token_identity
from streamlens.results.highway import ToyConfig


def _reference_training(stack: toy.Stack, x: torch.Tensor, y: torch.Tensor, config: ToyConfig):
    """The toy training loop written plainly: retain_grad on every stream, loss.backward(), per-tensor Adam."""
    optimiser = torch.optim.Adam(stack.parameters(), lr=config.lr, foreach=False)
    order = torch.Generator().manual_seed(config.seed + 1)
    losses, norms = [], []
    for step in range(config.steps + 1):
        rows = torch.randint(0, x.shape[0], (config.batch,), generator=order)
        optimiser.zero_grad()
        streams: list[torch.Tensor] = []
        loss = (stack(x[rows], streams) - y[rows]).pow(2).mean()
        for stream in streams:
            stream.retain_grad()
        loss.backward()
        losses.append(loss.detach())
        norms.append(torch.stack([stream.grad.norm() for stream in streams]))
        if step < config.steps:
            optimiser.step()
    with torch.no_grad():
        final = float((stack(x) - y).pow(2).mean())
    return torch.stack(losses), torch.stack(norms), final


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_toy_training_equals_the_plain_loop_bit_for_bit(norm):
    config = ToyConfig(depths=(5,), steps=6, width=8, batch=16, n_train=64, d_in=4, norm=norm, lr=1e-2)
    x, y = toy.teacher_task(config)
    with toy.one_thread():
        for kind in toy.KINDS:
            fast = toy.train_stack(toy.make_stack(config, 5, kind), x, y, config)
            plain = _reference_training(toy.make_stack(config, 5, kind), x, y, config)
            assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1]) and fast[2] == plain[2]
            assert not torch.equal(fast[1][0], fast[1][-1])  # training moved the weights: the test can fail


def test_identity_read_out_ranks_and_cosines_match_a_direct_count(tiny):
    """log10(1 + rank) and cosine of the current token, every stage: pooled means over all tokens."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, tiny.info.d_vocab, (4, 70), generator=generator)  # 280 tokens: two read-out chunks
    windows = TextWindows(tokens, torch.tensor([0, 0, 1, 1]), 2, "random")
    result = token_identity(tiny, windows, n_boot=20)
    log_rank, cosine = result.get("log10_rank"), result.get("cosine")
    labels = tokens.flatten()
    with torch.no_grad():
        for stage, stream in stage_features(tiny, tokens, None).items():
            flat = stream.reshape(-1, stream.shape[-1])
            expected_ranks, expected_cosines = [], []
            for row, label in zip(flat, labels):
                scores = tiny.final_norm(row[None])[0] @ tiny.W_E.T
                expected_ranks.append(math.log10(1 + int((scores > scores[label]).sum())))
                expected_cosines.append(float(torch.nn.functional.cosine_similarity(row, tiny.W_E[label], dim=0)))
            assert abs(float(log_rank[stage]) - sum(expected_ranks) / len(labels)) < 1e-12
            assert abs(float(cosine[stage]) - sum(expected_cosines) / len(labels)) < 1e-12
    assert float(log_rank[0]) != float(log_rank[-1])  # the ranks change with depth: the comparison can fail
