"""Recording: the writes are complete (they add up to the final stream) and nothing else is kept."""

from __future__ import annotations

import pytest
import torch

from streamlens.recording import record
from streamlens.results import StreamWrites


def test_writes_sum_to_final_stream(tiny, tiny_tokens):
    writes = record(tiny, tiny_tokens)
    assert writes.identity_error() <= 1e-10
    # and the record is not trivially complete: dropping any one write breaks the identity
    assert (writes.stream(tiny.n_layers - 1) - writes.mlp[1] - writes.final).abs().max() > 1e-3


def test_head_writes_sum_to_attention_write(tiny, tiny_tokens):
    writes = record(tiny, tiny_tokens, heads=True)
    assert writes.heads is not None and writes.z.shape[-1] == tiny.info.d_head  # z kept, writes on demand
    rebuilt = writes.heads.sum(3) + writes.attn_bias[:, None, None, :]
    assert (rebuilt - writes.attn).abs().max() <= 1e-10
    for layer in range(tiny.n_layers):
        assert torch.equal(writes.head_writes(layer), writes.heads[layer])


def test_final_stream_gives_the_logits(tiny, tiny_tokens):
    writes = record(tiny, tiny_tokens)
    assert (tiny.final_logits(writes.final) - writes.logits).abs().max() <= 1e-10
    assert torch.equal(writes.logits, tiny.run(tiny_tokens))  # recording changes nothing


def test_components_are_in_stream_order(tiny, tiny_tokens):
    comps = record(tiny, tiny_tokens).components()
    n_embed = 2 if tiny.has_pos_embed else 1
    assert len(comps.labels) == n_embed + 2 * tiny.n_layers
    assert comps.labels[n_embed:n_embed + 2] == ("attn 0", "mlp 0")
    assert comps.stack.shape == (len(comps.labels), *tiny_tokens.shape, tiny.info.d_model)


def test_save_load_roundtrip(tiny, tiny_tokens, tmp_path):
    writes = record(tiny, tiny_tokens, heads=True)
    path = writes.save(tmp_path / "writes.safetensors")
    again = StreamWrites.load(path)
    assert torch.equal(again.attn, writes.attn) and torch.equal(again.z, writes.z)
    assert all(torch.equal(a, b) for a, b in zip(again.W_O, writes.W_O, strict=True))
    assert (again.heads - writes.heads).abs().max() <= 1e-15  # the same sums (memory layout may differ)
    assert again.provenance == writes.provenance and again.norm == writes.norm
    assert len(again.to_dataframe()) == len(writes.components().labels) * tiny_tokens.numel()


def test_no_hooks_left_after_record(tiny, tiny_tokens):
    record(tiny, tiny_tokens, heads=True)
    assert not tiny.has_hooks()


@pytest.mark.real
def test_smollm2_writes_sum_to_final_stream(smol):
    writes = record(smol, smol.to_tokens("The capital of France is"), heads=True)
    relative = writes.identity_error() / float(writes.final.abs().max())
    assert relative <= 1e-5
    rebuilt = writes.heads.sum(3) + writes.attn_bias[:, None, None, :]
    assert (rebuilt - writes.attn).abs().max() / writes.attn.abs().max() <= 1e-5
