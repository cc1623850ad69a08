"""The gradient highway: identities of residual blocks, reproducibility, gradients at init, the real
model with skips removed, and the `streamlens highway` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from streamlens.files import OUTPUTS_MANIFEST as MANIFEST
from streamlens import highway as hw
from streamlens import sites
from streamlens.cli import app
from streamlens.highway.toy import Block

SMALL = dict(depths=(2, 3), steps=3, width=8, n_train=64, batch=16, d_in=4)


# ----- residual maths -----------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_residual_stack_with_zero_branches_is_exactly_the_identity(norm):
    config = hw.ToyConfig(depths=(6,), width=16, norm=norm)
    stack = hw.make_stack(config, 6, "residual")
    with torch.no_grad():
        for block in stack.blocks:
            block.W2.weight.zero_(), block.W2.bias.zero_()
    h = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 16, dtype=torch.float64)
    out = stack.body(h)
    (grad,) = torch.autograd.grad(out, h, upstream)
    assert torch.equal(out, h)  # bit for bit, not approximately
    assert torch.equal(grad, upstream)
    assert hw.zero_branch_check(config) == (0.0, 0.0)


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_residual_jacobian_is_identity_plus_block_jacobian(norm):
    torch.manual_seed(0)
    block = Block(5, norm, "torch")
    with torch.no_grad():  # non-trivial norm weights, and ReLUs that are open, so a forgotten term shows
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        block.W1.bias.fill_(1.0)
    x = torch.randn(5, dtype=torch.float64)
    jacobian_F = torch.autograd.functional.jacobian(block, x)
    jacobian_residual = torch.autograd.functional.jacobian(lambda h: h + block(h), x)
    torch.testing.assert_close(jacobian_residual, torch.eye(5, dtype=torch.float64) + jacobian_F, rtol=0, atol=1e-14)
    assert (jacobian_F.abs() > 1e-6).any()  # F is not trivially zero


def test_two_residual_blocks_chain_to_a_product_of_identity_plus_jacobians():
    config = hw.ToyConfig(depths=(2,), width=4)
    stack = hw.make_stack(config, 2, "residual")
    h = torch.randn(1, 4, dtype=torch.float64)
    first = stack.blocks[0]
    middle = (h + first(h))[0]
    J1 = torch.autograd.functional.jacobian(first, h[0])
    J2 = torch.autograd.functional.jacobian(stack.blocks[1], middle)
    eye = torch.eye(4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: stack.body(v[None])[0], h[0])
    torch.testing.assert_close(jacobian, (eye + J2) @ (eye + J1), rtol=0, atol=1e-13)


# ----- the toy experiment -------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers():
    first, again = hw.toy_highway(hw.ToyConfig(**SMALL)), hw.toy_highway(hw.ToyConfig(**SMALL))
    other = hw.toy_highway(hw.ToyConfig(**SMALL, seed=1))
    for name in ("grad_norm", "loss", "final_loss"):
        torch.testing.assert_close(getattr(first, name), getattr(again, name), rtol=0, atol=0, equal_nan=True)
        assert not torch.allclose(getattr(first, name), getattr(other, name), equal_nan=True)


def test_plain_and_residual_start_from_the_same_weights():
    config = hw.ToyConfig(**SMALL)
    plain, residual = (hw.make_stack(config, 3, kind).state_dict() for kind in hw.KINDS)
    assert plain.keys() == residual.keys()
    assert all(torch.equal(plain[key], residual[key]) for key in plain)


def test_result_shapes_padding_and_round_trip(tmp_path):
    toy = hw.toy_highway(hw.ToyConfig(**SMALL))
    assert toy.grad_norm.shape == (2, 2, SMALL["steps"] + 1, 3)
    assert toy.grad_norm[:, 0, :, 2].isnan().all() and toy.grad_norm[:, 1].isfinite().all()
    loaded = hw.ToyHighway.load(toy.save(tmp_path / "toy.safetensors"))
    assert loaded.config == toy.config
    torch.testing.assert_close(loaded.grad_norm, toy.grad_norm, equal_nan=True)
    frame = toy.to_dataframe()
    grads = frame[frame.measure == "grad_norm"]
    assert len(grads) == 2 * (2 + 3) * (SMALL["steps"] + 1)  # padding never becomes a row
    assert set(frame.measure) == {"grad_norm", "loss", "final_loss"}


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_plain_stack_loses_the_gradient_at_init_and_residual_keeps_it(seed):
    depth = 32
    toy = hw.toy_highway(hw.ToyConfig(depths=(depth,), steps=0, seed=seed))
    plain, residual = (float(r) for r in toy.first_to_last(0)[:, 0])
    assert plain < 1e-6 * residual
    # ...and both agree with the per-block gain of the init (1/18 vs 1 + 1/18, see torch_init_ratio)
    assert abs(math.log10(plain / hw.torch_init_ratio("plain", depth))) < 3
    assert abs(math.log10(residual / hw.torch_init_ratio("residual", depth))) < math.log10(1.5)


def test_with_layer_norm_the_deep_plain_stack_still_gets_less_gradient_at_init():
    toy = hw.toy_highway(hw.ToyConfig(depths=(32,), steps=0, norm="layer"))
    plain, residual = (float(r) for r in toy.first_to_last(0)[:, 0])
    assert plain < residual


@pytest.mark.parametrize(("bad", "named"), [
    (dict(depths=(0,)), "depth 0"), (dict(depths=()), "depths is empty"), (dict(depths=(2, 2)), "[2, 2]"),
    (dict(steps=-1), "steps -1"), (dict(width=0), "width 0"), (dict(lr=-1.0), "lr -1.0"), (dict(lr=float("nan")), "lr nan"),
    (dict(norm="batch"), "'batch'"), (dict(init="xavier"), "'xavier'"), (dict(seed=-1), "seed -1"),
])
def test_bad_toy_settings_name_the_value(bad, named):
    with pytest.raises(ValueError) as error:
        hw.ToyConfig(**bad)
    assert named in str(error.value)


def test_figures_come_from_the_result():
    from streamlens.plots import highway as plots

    toy = hw.toy_highway(hw.ToyConfig(**SMALL))
    heatmaps = plots.gradient_heatmaps(toy)
    assert [trace.name for trace in heatmaps.data] == ["plain", "residual"]
    assert len({(trace.zmin, trace.zmax) for trace in heatmaps.data}) == 1  # one shared colour scale
    losses = plots.loss_vs_depth(toy)
    assert [list(trace.y) for trace in losses.data] == toy.final_loss.tolist()
    with pytest.raises(ValueError, match="depth 5"):
        plots.gradient_heatmaps(toy, 5)


# ----- a real (tiny and SmolLM2) model ----------------------------------------------------------
def test_hooked_gradient_is_the_gradient_of_the_stream_entering_the_block(tiny, tiny_tokens):
    streams: dict[int, torch.Tensor] = {}
    result = hw.skip_gradients(tiny, tiny_tokens, [()])
    with torch.no_grad():
        tiny.run(tiny_tokens, hooks=hw.skip_removal_hooks(tiny, (), streams))
    for layer in range(tiny.n_layers):
        resid = streams[layer].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = tiny.run(resid, start_at_layer=layer)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tiny_tokens[:, 1:].flatten())
            (grad,) = torch.autograd.grad(loss, resid)
        torch.testing.assert_close(result.grad_norm[0, layer], grad.norm(), rtol=1e-10, atol=0)
    assert not tiny.has_hooks()


def test_removing_a_skip_makes_the_next_stream_the_blocks_writes(tiny, tiny_tokens):
    streams: dict[int, torch.Tensor] = {}
    writes: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(tensor, hook):
            writes[name] = tensor.detach()

        return hook

    hooks = hw.skip_removal_hooks(tiny, (1,), streams) + [(sites.attn_out(1), keep("attn")), (sites.mlp_out(1), keep("mlp"))]
    with torch.no_grad():
        tiny.run(tiny_tokens, hooks=hooks)
    torch.testing.assert_close(streams[2], writes["attn"] + writes["mlp"], rtol=0, atol=1e-12)
    result = hw.skip_gradients(tiny, tiny_tokens, [(), (1,)])
    # blocks before the cut see the same stream; the one after it does not
    torch.testing.assert_close(result.stream_norm[1, :2], result.stream_norm[0, :2], rtol=0, atol=0)
    assert not torch.isclose(result.stream_norm[1, 2], result.stream_norm[0, 2])
    assert result.conditions == (hw.ALL_SKIPS, "no skip: 1")


def test_parse_layers():
    assert hw.parse_layers("none", 30) == ()
    assert hw.parse_layers("all", 4) == (0, 1, 2, 3)
    assert hw.parse_layers("12,10-11, 3", 30) == (3, 10, 11, 12)
    with pytest.raises(ValueError, match=r"layer 30 .*\(0-29\)"):
        hw.parse_layers("29-30", 30)
    with pytest.raises(ValueError, match="'x' not understood"):
        hw.parse_layers("x", 30)


@pytest.mark.real
def test_smollm2_gradients_reach_every_layer_and_cutting_skips_changes_them(smol):
    tokens = smol.to_tokens("The quick brown fox jumps over the lazy dog.")
    result = hw.skip_gradients(smol, tokens, [(), (10, 11, 12)])
    assert result.grad_norm.shape == (2, smol.n_layers)
    assert result.grad_norm[0].isfinite().all() and (result.grad_norm[0] > 0).all()
    assert not torch.isclose(result.grad_norm[0, 0], result.grad_norm[1, 0], rtol=1e-3)
    # blocks before the first cut see the same stream in both conditions
    torch.testing.assert_close(result.stream_norm[1, :11], result.stream_norm[0, :11])
    assert not smol.has_hooks()


# ----- the command --------------------------------------------------------------------------------
def test_cli_quick_run_writes_three_files(tmp_path):
    out = tmp_path / "highway"
    run = CliRunner().invoke(app, ["highway", "--depths", "2,4", "--steps", "5", "--skip-real", "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "highway.csv", "highway.html", "highway.json"]
    meta = json.loads((out / "highway.json").read_text())
    assert meta["seed"] == 0 and meta["settings"]["depths"] == [2, 4] and meta["seconds"]["total"] > 0
    assert set(meta["summary"]["toy"]["final_loss"]) == {"plain", "residual"}
    header = (out / "highway.csv").read_text().splitlines()[0]
    assert header == "part,kind,depth,step,layer,measure,value"
    assert "plotly" in (out / "highway.html").read_text()[:5_000_000]


@pytest.mark.parametrize("options", [["--depths", "0"], ["--depths", "abc"], ["--depths", "2,,4"],
                                     ["--steps", "-1"], ["--width", "0"], ["--norm", "batch"]])
def test_cli_bad_options_exit_2_and_write_nothing(tmp_path, options):
    out = tmp_path / "highway"
    run = CliRunner().invoke(app, ["highway", "--skip-real", "--out", str(out), *options])
    assert run.exit_code == 2
    assert "error:" in run.output and "Traceback" not in run.output
    assert not out.exists()


def test_cli_unwritable_out_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = CliRunner().invoke(app, ["highway", "--depths", "2", "--steps", "1", "--skip-real",
                                   "--out", str(blocker / "sub")])
    assert run.exit_code == 2 and "error:" in run.output
    assert blocker.read_text() == "x"
