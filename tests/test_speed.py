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


def _reference_lens(model, tokens: torch.Tensor, steps: int, lr: float, batch_tokens: int, seed: int):
    """The tuned lens trained plainly: one [stage, d, d] leaf, one stage's graph and backward at a time."""
    from streamlens.tunedlens.train import stage_streams

    streams, final = stage_streams(model, tokens)
    n_stages, n_tokens, d_model = streams.shape
    weight = torch.zeros(n_stages, d_model, d_model, dtype=streams.dtype, requires_grad=True)
    bias = torch.zeros(n_stages, d_model, dtype=streams.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, losses = torch.randperm(n_tokens, generator=generator), 0, []
    for _ in range(steps):
        if cursor + batch_tokens > n_tokens:
            order, cursor = torch.randperm(n_tokens, generator=generator), 0
        chosen = order[cursor: cursor + batch_tokens]
        cursor += batch_tokens
        with torch.no_grad():
            final_logprobs = model.final_logits(final[chosen]).log_softmax(-1)
        optimiser.zero_grad(set_to_none=False)
        total = 0.0
        for stage in range(n_stages):
            stream = streams[stage, chosen]
            lens_logprobs = model.final_logits(stream + stream @ weight[stage] + bias[stage]).log_softmax(-1)
            loss = (final_logprobs.exp() * (final_logprobs - lens_logprobs)).sum(-1).mean()
            loss.backward()
            total += float(loss.detach())
        optimiser.step()
        losses.append(total)
    return weight.detach(), bias.detach(), torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("rows_per_pass", [10, 256])
def test_tuned_lens_training_equals_the_stage_by_stage_loop(tiny, monkeypatch, rows_per_pass):
    """Bit for bit on the Intel machines it was written on; a BLAS may sum the rows of a taller matmul
    in another order (AMD EPYC, torch 2.13: 8e-14 relative on the weights after 4 Adam steps, 3e-16 on
    the losses), so the check is float64 rounding, far below a wrong term (1e-3 and up)."""
    from streamlens.tunedlens import train

    monkeypatch.setattr(train, "ROWS_PER_PASS", rows_per_pass)  # 10: 2 stages of 5 tokens per graph, 2 graphs
    tokens = torch.randint(3, tiny.info.d_vocab, (3, 8), generator=torch.Generator().manual_seed(4))
    lens = train.train_tuned_lens(tiny, tokens, steps=4, lr=1e-2, batch_tokens=5, seed=1)
    weight, bias, losses = _reference_lens(tiny, tokens, steps=4, lr=1e-2, batch_tokens=5, seed=1)
    for got, want in ((lens.weight, weight), (lens.bias, bias), (lens.train_loss, losses)):
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()
    assert weight.abs().max() > 0  # the lens moved: the comparison can fail


@pytest.mark.parametrize("rows_per_pass", [16, 256])
def test_lens_comparison_equals_a_stage_by_stage_read(tiny, monkeypatch, rows_per_pass):
    """KL and rank of both lenses, every stage and window, against one read per stage (torch.equal)."""
    from streamlens.recording import record
    from streamlens.tunedlens import compare_lenses, train, train_tuned_lens

    tokens = torch.randint(3, tiny.info.d_vocab, (2, 8), generator=torch.Generator().manual_seed(5))
    lens = train_tuned_lens(tiny, tokens, steps=3, lr=1e-2, batch_tokens=6)
    monkeypatch.setattr(train, "ROWS_PER_PASS", rows_per_pass)  # 16: 2 stages of 8 positions per matmul
    comparison = compare_lenses(tiny, tokens, lens)
    with torch.inference_mode():
        for window in range(2):
            writes = record(tiny, tokens[window: window + 1])
            final = writes.logits[0].log_softmax(-1)
            top = final.argmax(-1, keepdim=True)
            for stage in range(tiny.n_layers + 1):
                stream = writes.final[0] if stage == tiny.n_layers else writes.stream(stage - 1 if stage else None)[0]
                for index, read in enumerate((stream, lens.translate(stage, stream))):
                    logprobs = tiny.final_logits(read).log_softmax(-1)
                    kl = (final.exp() * (final - logprobs)).sum(-1).double()
                    rank = (logprobs > logprobs.gather(-1, top)).sum(-1).double()
                    assert torch.equal(comparison.kl[index, stage, window], kl)
                    assert torch.equal(comparison.rank[index, stage, window], rank)
    assert not torch.equal(comparison.kl[0], comparison.kl[1])  # the trained lens differs from the logit lens
