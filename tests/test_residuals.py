"""The residual family (`streamlens residuals`): each connection against a hand-written float64
computation, the identities (ReZero at init, a closed highway gate, deleting nothing), gradient norms
against autograd, memory counting, reproducibility, the verdict statistics and the command."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from streamlens.cli import app
from streamlens.files import OUTPUTS_MANIFEST as MANIFEST
from streamlens.highway import lesion, testbeds, training, variants, verdicts
from streamlens.highway.study import residual_study
from streamlens.results.residuals import VARIANTS, ResidualConfig, ResidualStudy

D = torch.float64
WIDTH = 6


def _sublayer() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH, dtype=D), nn.Tanh(), nn.Linear(WIDTH, WIDTH, dtype=D))


def _perturb(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter (norm weights and biases, gates, dense weights, ReZero's a)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=D) * 0.7)


def _layer_norm(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _hand(variant: str, connection: nn.Module, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    f = connection.sublayer
    if variant == "plain":
        return f(x)
    if variant == "pre_norm":
        return x + f(_layer_norm(x, connection.norm))
    if variant == "post_norm":
        return _layer_norm(x + f(x), connection.norm)
    if variant == "highway":
        gate = 1 / (1 + torch.exp(-(x @ connection.gate.weight.T + connection.gate.bias)))
        return gate * f(x) + (1 - gate) * x
    if variant == "rezero":
        return x + connection.alpha * f(x)
    if variant == "dense":
        out = connection.self_weight * (x + f(_layer_norm(x, connection.norm)))
        return out + sum(w * h for w, h in zip(connection.weights, history))
    if variant == "concat":
        joined = torch.cat(history, -1) @ connection.project.weight.T + connection.project.bias
        return f(_layer_norm(joined, connection.norm))
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_connection_matches_its_formula_written_by_hand(variant):
    torch.manual_seed(0)
    index = 2
    connection = variants.connect(variant, _sublayer(), WIDTH, index, D)
    _perturb(connection)
    history = [torch.randn(5, WIDTH, dtype=D) for _ in range(index + 1)]
    expected = _hand(variant, connection, history[-1], history)
    torch.testing.assert_close(connection(history[-1], history), expected, rtol=1e-12, atol=1e-12)


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown variant 'resnet'.*plain, pre_norm"):
        variants.connect("resnet", _sublayer(), WIDTH, 0, D)


@pytest.mark.parametrize("variant", ["rezero", "dense"])
def test_rezero_at_init_is_the_identity_and_dense_at_init_is_pre_norm(variant):
    torch.manual_seed(1)
    stack = variants.Stack([variants.connect(variant, _sublayer(), WIDTH, i, D) for i in range(4)])
    x = torch.randn(3, WIDTH, dtype=D, requires_grad=True)
    if variant == "rezero":
        upstream = torch.randn(3, WIDTH, dtype=D)
        out = stack(x)
        (grad,) = torch.autograd.grad(out, x, upstream)
        assert torch.equal(out, x) and torch.equal(grad, upstream)
    else:
        torch.manual_seed(1)
        pre = variants.Stack([variants.connect("pre_norm", _sublayer(), WIDTH, i, D) for i in range(4)])
        torch.testing.assert_close(stack(x), pre(x), rtol=0, atol=0)


def test_a_closed_highway_gate_is_the_identity_and_an_open_one_is_the_sublayer():
    torch.manual_seed(2)
    connection = variants.connect("highway", _sublayer(), WIDTH, 0, D)
    _perturb(connection)
    x = torch.randn(4, WIDTH, dtype=D)
    with torch.no_grad():
        connection.gate.weight.zero_()
        connection.gate.bias.fill_(-math.inf)  # T = sigmoid(-inf) = 0 exactly
        assert torch.equal(connection(x, [x]), x)
        connection.gate.bias.fill_(math.inf)  # T = 1
        assert torch.equal(connection(x, [x]), connection.sublayer(x))
    assert variants.GATE_BIAS < 0  # Srivastava et al. 2015: a negative bias, the layer starts carrying


def test_a_fresh_highway_gate_carries_most_of_its_input():
    connection = variants.connect("highway", _sublayer(), WIDTH, 0, D)
    x = torch.zeros(2, WIDTH, dtype=D)
    gate = torch.sigmoid(connection.gate(x))
    torch.testing.assert_close(gate, torch.full_like(gate, 1 / (1 + math.exp(2.0))))


@pytest.mark.parametrize("variant", ["plain", "pre_norm", "highway"])
def test_deleting_a_block_equals_the_stack_without_it_and_deleting_nothing_changes_nothing(variant):
    torch.manual_seed(3)
    connections = [variants.connect(variant, _sublayer(), WIDTH, i, D) for i in range(4)]
    for c in connections:
        _perturb(c, seed=len(list(c.parameters())))
    stack, without = variants.Stack(connections), variants.Stack([connections[i] for i in (0, 1, 3)])
    x = torch.randn(5, WIDTH, dtype=D)
    assert torch.equal(stack(x, None, frozenset()), stack(x))
    torch.testing.assert_close(stack(x, None, frozenset({2})), without(x), rtol=0, atol=0)


def test_transformer_blocks_are_two_connections_and_a_lesion_removes_both():
    torch.manual_seed(4)
    model = testbeds.CharLM("pre_norm", 3, vocab=11).double()
    ids = torch.randint(0, 11, (2, 7))
    streams: list[torch.Tensor] = []
    full = model(ids, streams)
    assert len(streams) == 3 and full.shape == (2, 7, 11)
    stack = model.stack
    x = model.embed(ids) + model.position[:7]
    for index in (0, 1, 4, 5):  # blocks 0 and 2, by hand
        x = stack.connections[index](x, [])
    expected = model.unembed(model.final_norm(x))
    torch.testing.assert_close(model(ids, None, frozenset({1})), expected, rtol=1e-12, atol=1e-12)


def test_attention_is_causal_and_matches_a_hand_computation():
    torch.manual_seed(5)
    attention = testbeds.Attention(8, 2).double()
    x = torch.randn(1, 5, 8, dtype=D)
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(8, -1)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        scores = q[..., part] @ k[..., part].transpose(-1, -2) / 2.0
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
        heads.append(scores.softmax(-1) @ v[..., part])
    expected = torch.cat(heads, -1) @ attention.out.weight.T + attention.out.bias
    torch.testing.assert_close(attention(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("residual", [True, False])
def test_basic_block_matches_the_paper_by_hand(residual):
    torch.manual_seed(6)
    block = testbeds.BasicBlock(3, 5, 2, residual).double().eval()  # a projection shortcut: shape changes
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
            _perturb(module, seed=7)
    x = torch.randn(2, 3, 8, 8, dtype=D)

    def bn(t, m):
        shape = (1, -1, 1, 1)
        return ((t - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
                * m.weight.view(shape) + m.bias.view(shape))

    branch = bn(F.conv2d(torch.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1)),
                         block.conv2.weight, padding=1), block.bn2)
    shortcut = bn(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    expected = torch.relu(branch + shortcut if residual else branch)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_cnn_only_deletes_blocks_that_keep_their_shape():
    model = testbeds.DigitsCNN("residual", 5)
    assert model.lesionable == (0, 1, 2, 4)  # block 3 is strided with a projection
    with pytest.raises(ValueError, match="unknown digits variant 'pre_norm'"):
        testbeds.DigitsCNN("pre_norm", 2)


def _tiny_testbed() -> testbeds.Testbed:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, testbeds.MLP_D_IN, generator=generator, dtype=D), torch.randn(40, generator=generator, dtype=D)
    return testbeds.Testbed("mlp", x[:30], y[:30], x[30:], y[30:], lambda v, d: testbeds.MLPModel(v, d),
                            lambda out, target: (out - target).pow(2).mean(), False, 1e-3, 8, D)


@pytest.mark.parametrize("variant", ["plain", "highway", "dense"])
def test_stream_gradient_norms_agree_with_autograd_by_hand(variant):
    bed = _tiny_testbed()
    model = training.build_model(bed, variant, 3, seed=0)
    _, measured = training.stream_gradients(model, bed, bed.train_x, bed.train_y)
    # by hand: rebuild the stream, ask autograd for d loss / d h_b directly
    h = model.embed(bed.train_x)
    inputs, history = [], [h]
    for connection in model.stack.connections:
        inputs.append(h)
        h = connection(h, history)
        history.append(h)
    loss = bed.loss(model.readout(model.final_norm(h)).squeeze(-1), bed.train_y)
    grads = torch.autograd.grad(loss, inputs)
    torch.testing.assert_close(measured, torch.stack([g.norm() for g in grads]), rtol=1e-12, atol=0)


def test_saved_bytes_count_each_activation_once_and_skip_parameters():
    layer = nn.Linear(4, 4, dtype=D)
    bed = types.SimpleNamespace(loss=lambda out, target: (out * out).sum() + (out * out).sum())

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    x = torch.randn(3, 4, dtype=D)
    # saved: x (for the weight's gradient) and the output (twice, counted once): 2 x 3 x 4 x 8 bytes
    assert training.saved_activation_bytes(Wrapped(), bed, x, None) == 2 * 3 * 4 * 8


def test_concatenation_saves_more_than_a_residual_stack_and_grows_faster():
    bed = _tiny_testbed()
    size = {(v, d): training.saved_activation_bytes(training.build_model(bed, v, d, 0), bed, bed.train_x, bed.train_y)
            for v in ("pre_norm", "concat") for d in (2, 4, 8)}
    assert size["concat", 8] > size["pre_norm", 8]
    assert size["concat", 8] - size["concat", 4] > 1.5 * (size["concat", 4] - size["concat", 2])  # quadratic
    assert size["pre_norm", 8] - size["pre_norm", 4] == 2 * (size["pre_norm", 4] - size["pre_norm", 2])  # linear


def test_lesion_profile_is_evaluate_with_each_block_deleted():
    bed = _tiny_testbed()
    model = training.build_model(bed, "pre_norm", 3, 0)
    losses, accuracies = lesion.lesion_profile(model, bed, max_depth=5)
    assert losses.shape == (5,) and torch.isnan(losses[3:]).all() and torch.isnan(accuracies).all()
    assert float(losses[1]) == training.evaluate(model, bed, frozenset({1}))[0]
    assert training.evaluate(model, bed, frozenset())[0] == training.evaluate(model, bed)[0]


@pytest.mark.parametrize(("variant", "bed_name"), [("post_norm", "mlp"), ("rezero", "mlp"), ("pre_norm", "lm")])
def test_parameter_gradient_norms_agree_with_autograd_per_block(variant, bed_name):
    bed = _tiny_testbed()
    if bed_name == "lm":  # two connections per block: both must be counted in the block
        model = testbeds.CharLM(variant, 3, vocab=7).double()
        ids = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(0))
        bed = types.SimpleNamespace(loss=lambda out, target: F.cross_entropy(out.flatten(0, 1), target.flatten()))
        inputs, targets = ids[:, :-1], ids[:, 1:]
    else:
        model = training.build_model(bed, variant, 3, seed=0)
        inputs, targets = bed.train_x, bed.train_y
    model.zero_grad(set_to_none=True)
    training.stream_gradients(model, bed, inputs, targets)
    measured = training.parameter_gradients(model)
    # by hand: autograd.grad of a fresh loss with respect to each block's parameters, named by prefix
    loss = bed.loss(model(inputs), targets)
    named = dict(model.named_parameters())
    per = model.stack.per_block
    for block in range(3):
        prefixes = tuple(f"stack.connections.{block * per + k}." for k in range(per))
        params = [p for name, p in named.items() if name.startswith(prefixes)]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        expected = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        torch.testing.assert_close(measured[block], expected.norm().double(), rtol=1e-10, atol=1e-300)
    if variant == "rezero":  # at init only a's gradient is non-zero: F's weights are multiplied by a = 0
        assert all(float(c.alpha.grad.abs()) == float(measured[i]) for i, c in enumerate(model.stack.connections))


def test_reuse_ablation_is_zero_at_init_and_a_hand_written_stack_without_earlier_states():
    bed = _tiny_testbed()
    model = training.build_model(bed, "dense", 4, seed=0)
    share, loss = lesion.reuse_ablation(model, bed)
    assert share == 0 and loss == training.evaluate(model, bed)[0]  # a_j = 0 at init: nothing to remove
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for connection in model.stack.connections:
            connection.weights.copy_(torch.randn(connection.weights.shape, generator=generator, dtype=D))
            connection.self_weight.fill_(0.8)
    before = [c.weights.clone() for c in model.stack.connections]
    share, loss = lesion.reuse_ablation(model, bed)
    far = sum(float(c.weights.detach()[:-1].abs().sum()) for c in model.stack.connections)
    near = sum(float(c.weights.detach()[-1].abs()) + 0.8 for c in model.stack.connections)
    assert share == pytest.approx(far / (far + near))
    with torch.no_grad():  # by hand: y = a_self (x + F(LN(x))) + a_own x, earlier states dropped
        h = model.embed(bed.heldout_x)
        for c in model.stack.connections:
            h = c.self_weight * (h + c.sublayer(_layer_norm(h, c.norm))) + c.weights[-1] * h
        expected = float(bed.loss(model.readout(model.final_norm(h)).squeeze(-1), bed.heldout_y))
    assert loss == pytest.approx(expected, rel=1e-12) and loss != training.evaluate(model, bed)[0]
    assert all(torch.equal(b, c.weights) for b, c in zip(before, model.stack.connections))  # on a copy
    assert all(math.isnan(v) for v in lesion.reuse_ablation(training.build_model(bed, "pre_norm", 2, 0), bed))


TINY = ResidualConfig(testbeds=("mlp", "lm", "cnn"), mlp_variants=("plain", "pre_norm", "highway", "dense", "concat"),
                      lm_variants=("plain", "pre_norm", "post_norm", "rezero"), seeds=(0, 1), mlp_depths=(1, 2),
                      lm_depths=(1, 2), cnn_depths=(1, 2), steps=2, eval_every=1, warmup=2)


@pytest.fixture(scope="module")
def tiny_study() -> ResidualStudy:
    return residual_study(TINY, command="test")


def test_same_config_same_numbers_bit_for_bit_in_one_process_or_two(tiny_study):
    again = residual_study(ResidualConfig(**{**TINY.__dict__, "testbeds": ("mlp", "cnn")}), command="test", workers=2)
    for field in ("train_loss", "heldout_loss", "heldout_accuracy", "grad_norm", "param_grad_norm", "lesion_loss",
                  "saved_bytes", "reuse_share", "reuse_loss"):
        first = getattr(tiny_study, field)[[r for r, t in enumerate(tiny_study.run_testbed) if t != "lm"]]
        assert torch.equal(first.nan_to_num(-1), getattr(again, field).nan_to_num(-1)), field


def test_study_shapes_round_trip_and_table(tiny_study, tmp_path):
    runs = len(tiny_study.run_testbed)
    assert runs == 2 * 2 * (5 + 4 + 2) + 2 * 2  # + pre/post-norm warm-up runs at the deepest lm depth
    assert tiny_study.grad_norm.shape == (runs, 3, 2) and tiny_study.eval_steps == (0, 1, 2)
    first = tiny_study.runs("mlp", "plain", 1)
    assert torch.isnan(tiny_study.grad_norm[first, :, 1]).all() and not torch.isnan(tiny_study.grad_norm[first, :, 0]).any()
    path = tiny_study.save(tmp_path / "study.safetensors")
    loaded = ResidualStudy.load(path)
    assert loaded.config == TINY and loaded.run_variant == tiny_study.run_variant
    assert torch.equal(loaded.lesion_loss.nan_to_num(-1), tiny_study.lesion_loss.nan_to_num(-1))
    table = loaded.to_dataframe()
    assert set(table.measure) >= {"train_loss", "heldout_loss", "heldout_accuracy", "grad_norm", "param_grad_norm",
                                  "lesion_loss", "saved_bytes", "step_seconds", "reuse_share", "reuse_loss"}
    dense = tiny_study.runs("mlp", "dense", 2)
    assert not tiny_study.reuse_loss[dense].isnan().any() and tiny_study.reuse_loss[first].isnan().all()


def test_every_verdict_row_is_decided_from_the_study(tiny_study):
    rows = verdicts.residual_verdicts(tiny_study)
    assert len(rows) == 11
    for row in rows:
        assert row.verdict in ("holds", "differs", "unclear") and row.ci_low <= row.value <= row.ci_high
    by_claim = {row.claim: row for row in rows}
    reuse = next(row for claim, row in by_claim.items() if claim.startswith("Dense connections reuse"))
    runs = tiny_study.runs("mlp", "dense", 2)  # lm ran no dense variant: the toy MLP decides
    loss = tiny_study.heldout_loss[runs]
    assert reuse.value == pytest.approx(float(((tiny_study.reuse_loss[runs] - loss[:, -1]) / (loss[:, 0] - loss[:, -1])).mean()))
    params = next(row for claim, row in by_claim.items() if claim.startswith("Pre-norm parameter"))
    post, pre = (tiny_study.runs("lm", v, 2) for v in ("post_norm", "pre_norm"))
    ratio = (tiny_study.param_grad_norm[:, 0, 0] / tiny_study.param_grad_norm[:, 0, 1]).log10().abs()
    assert params.value == pytest.approx(float((ratio[post] - ratio[pre]).mean()))


def test_the_lesion_row_reads_the_deepest_depth_where_plain_trained(tiny_study):
    """Veit's comparison needs two trained nets: the row moves to the deepest CNN depth where every plain
    seed reaches TRAINED_ACCURACY, and with none it cannot decide."""
    def lesion_row(study):
        return next(row for row in verdicts.residual_verdicts(study) if row.claim.startswith("Deleting one block"))

    accuracy = tiny_study.heldout_accuracy.clone()
    shallow, deep = tiny_study.runs("cnn", "plain", 1), tiny_study.runs("cnn", "plain", 2)
    accuracy[shallow, -1], accuracy[deep, -1] = 0.9, 0.3  # plain trains at depth 1 only
    trained = dataclasses.replace(tiny_study, heldout_accuracy=accuracy)
    assert verdicts.trained_cnn_depth(trained) == 1
    row = lesion_row(trained)
    assert "digits CNN, 1 basic blocks" in row.protocol
    drop = {v: (accuracy[r, -1:] - tiny_study.lesion_accuracy[r]).nanmean(-1)
            for v, r in (("plain", shallow), ("residual", tiny_study.runs("cnn", "residual", 1)))}
    assert row.value == pytest.approx(float(100 * (drop["plain"] - drop["residual"]).mean()))
    accuracy[shallow, -1] = 0.5  # trains nowhere
    untrained = lesion_row(dataclasses.replace(tiny_study, heldout_accuracy=accuracy))
    assert untrained.verdict == "unclear" and "at no depth" in untrained.number
    assert "2 basic blocks (the deepest; plain trained at none)" in untrained.protocol


def test_seed_interval_is_the_student_t_interval_and_decides():
    values = torch.tensor([1.0, 2.0, 4.0])
    mean, low, high = verdicts.seed_interval(values)
    half = 4.303 * float(values.std()) / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    assert verdicts.decide(0.1, 0.5) == "holds" and verdicts.decide(-0.5, -0.1) == "differs"
    assert verdicts.decide(-0.1, 0.5) == "unclear" and verdicts.decide(1.2, 1.5, threshold=1.0) == "holds"


@pytest.mark.parametrize(("bad", "named"), [({"mlp_variants": ("resnet",)}, "unknown variant 'resnet'"),
                                            ({"mlp_depths": (0,)}, "depth 0"), ({"testbeds": ("rnn",)}, "'rnn'"),
                                            ({"seeds": ()}, "seeds is empty"), ({"steps": 0}, "steps 0"),
                                            ({"warmup": -1}, "warmup -1")])
def test_bad_settings_name_the_value(bad, named):
    with pytest.raises(ValueError, match=named):
        ResidualConfig(**bad)


# ----- the command --------------------------------------------------------------------------------
QUICK = ["--seeds", "0", "--testbeds", "mlp", "--variants", "plain,pre_norm", "--mlp-depths", "1,2", "--steps", "2",
         "--eval-every", "1", "--workers", "1"]


def test_cli_quick_run_writes_three_files(tmp_path):
    out = tmp_path / "residuals"
    run = CliRunner().invoke(app, ["residuals", *QUICK, "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "residuals.csv", "residuals.html", "residuals.json"]
    meta = json.loads((out / "residuals.json").read_text())
    assert meta["settings"]["mlp_depths"] == [1, 2] and set(meta["summary"]["mlp"]) == {"plain", "pre_norm"}
    header = (out / "residuals.csv").read_text().splitlines()[0]
    assert header == "testbed,variant,depth,seed,warmup,step,layer,measure,value"
    assert "plotly" in (out / "residuals.html").read_text()[:5_000_000]


@pytest.mark.parametrize("options", [["--variants", "plain,resnet"], ["--mlp-depths", "0"], ["--mlp-depths", "abc"],
                                     ["--testbeds", "rnn"], ["--testbeds", ""], ["--steps", "0"], ["--seeds", "x"],
                                     ["--variants", "plain,,rezero"], ["--eval-every", "0"],
                                     ["--workers", "0"], ["--seeds", "1,1"], ["--seeds", "0-2,1"],
                                     ["--mlp-depths", "2,2"], ["--variants", "plain,plain"], ["--mlp-depths", "257"],
                                     ["--mlp-depths", "1-100000"], ["--lm-depths", "-1"], ["--seeds", ""],
                                     ["--steps", "-5"], ["--eval-every", "3"], ["--lm-variants", "gpt"],
                                     ["--warmup", "-1"], ["--seeds", "4294967296"]])
def test_cli_bad_options_exit_2_and_write_nothing(tmp_path, options):
    out = tmp_path / "residuals"
    run = CliRunner().invoke(app, ["residuals", *QUICK, "--out", str(out), *options])
    assert run.exit_code == 2, run.output
    assert "error:" in run.output and "Traceback" not in run.output and len(run.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_repeated_seed_names_the_repeat(tmp_path):
    run = CliRunner().invoke(app, ["residuals", *QUICK, "--out", str(tmp_path / "r"), "--seeds", "1,1"])
    assert run.exit_code == 2 and "--seeds '1,1' repeats 1: give each seed once" in run.output


def test_cli_interrupted_run_writes_nothing(tmp_path, monkeypatch):
    import streamlens.highway.study as study_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "residual_study", interrupted)
    run = CliRunner().invoke(app, ["residuals", *QUICK, "--out", str(tmp_path / "r")])
    assert run.exit_code != 0 and not (tmp_path / "r").exists()


def test_a_second_run_into_the_same_out_replaces_the_whole_set(tmp_path):
    out = tmp_path / "r"
    for seed, testbed_options in (("0", ["--mlp-depths", "1,2"]), ("1", ["--mlp-depths", "1"])):
        run = CliRunner().invoke(app, ["residuals", *QUICK, *testbed_options, "--out", str(out), "--seeds", seed])
        assert run.exit_code == 0, run.output
    meta = json.loads((out / "residuals.json").read_text())
    rows = (out / "residuals.csv").read_text().splitlines()[1:]
    assert meta["settings"]["seeds"] == [1] and meta["settings"]["mlp_depths"] == [1]
    assert {row.split(",")[3] for row in rows} == {"1"} and {row.split(",")[2] for row in rows} == {"1"}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "residuals.csv", "residuals.html", "residuals.json"]


def test_without_lesions_the_lesion_fields_are_nan_and_their_rows_are_left_out():
    config = ResidualConfig(testbeds=("mlp",), mlp_variants=("pre_norm",), seeds=(0,), mlp_depths=(2,), steps=1,
                            eval_every=1, lesions=False)
    study = residual_study(config, command="test")
    assert study.lesion_loss.isnan().all() and study.config == config and not study.heldout_loss.isnan().any()
    assert not any("removed" in row.claim or "Deleting" in row.claim for row in verdicts.residual_verdicts(study))
    with pytest.raises(ValueError, match="lesions 'yes' must be True or False"):
        ResidualConfig(lesions="yes")


def test_cli_unwritable_out_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = CliRunner().invoke(app, ["residuals", *QUICK, "--out", str(blocker / "sub")])
    assert run.exit_code == 2 and "error:" in run.output
    assert blocker.read_text() == "x"


def test_figures_and_page_come_from_the_result(tiny_study):
    from streamlens.pages.residuals import residuals_files
    from streamlens.plots import residuals as plots

    deepest = plots.lesion_profile(tiny_study, "cnn")
    assert {trace.name for trace in deepest.data} == {"plain", "residual"}
    assert len(plots.gradient_by_layer(tiny_study, "mlp").data) == 2 * 2 * 5  # depths x (init, trained) x variants
    assert len(plots.loss_curves(tiny_study, "lm", 2).data) == 2 * 4
    with pytest.raises(ValueError, match="depth 7 was not run on lm"):
        plots.loss_curves(tiny_study, "lm", 7)
    files = residuals_files(tiny_study, "test", 1.0)
    meta = json.loads(files["residuals.json"])  # strict JSON: no NaN
    assert len(meta["verdicts"]) == 11 and meta["summary"]["cnn"]["residual"]["2"]["final_heldout_accuracy"]["per_seed"]


# ----- hostile: two runs into one --out at once (real processes; the interrupt is tested above) -----
def _spawn_residuals(out, *args):
    """`streamlens residuals` (the quick settings) as its own process, SIGINT at its default (see below)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # rich draws the progress bar live into the pipe
    # a background job's children inherit SIGINT ignored; Python raises KeyboardInterrupt only where it is not
    return subprocess.Popen([sys.executable, "-m", "streamlens", "residuals", *QUICK, "--out", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_cli_two_runs_into_one_out_at_once_leave_one_whole_set(tmp_path):
    out = tmp_path / "residuals"
    runs = [_spawn_residuals(out) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stdout.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "residuals.csv", "residuals.html", "residuals.json"]
    meta = json.loads((out / "residuals.json").read_text())  # whole: parses, and names both variants
    assert set(meta["summary"]["mlp"]) == {"plain", "pre_norm"}

