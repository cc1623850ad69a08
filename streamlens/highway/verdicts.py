"""The verdict table of the residual-family study: each claim, its protocol, our number, the verdict.

Every number is a mean over seeds (one value per seed: the seed sets weights and batch order) with a
95% Student-t interval (n - 1 degrees of freedom; seeds are few, so a bootstrap over them would be
too narrow). "holds" when the interval lies on the claim's side of zero, "differs" when it lies on the
other side, "unclear" when it contains zero. A row whose runs are not in the study is left out.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from streamlens.results.layers import Verdict
from streamlens.results.residuals import ResidualStudy

# two-sided 95% quantiles of Student's t, by degrees of freedom 1..30 (beyond: the normal 1.96)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

PAPERS = {
    "he": "He et al. 2016, 'Deep Residual Learning' (CIFAR-10, ImageNet): a 56-layer plain net has higher "
          "training error than a 20-layer one (degradation); the residual versions do not degrade.",
    "veit": "Veit et al. 2016, 'Residual Networks Behave Like Ensembles of Relatively Shallow Networks' "
            "(CIFAR-10, ImageNet): deleting one block of a trained ResNet at test time barely changes the error; "
            "deleting a layer of a plain (VGG) net drops it to chance.",
    "srivastava": "Srivastava, Greff & Schmidhuber 2015, 'Highway Networks' / 'Training Very Deep Networks' "
                  "(MNIST, CIFAR): highway nets of 100 layers train with plain SGD where plain nets stall.",
    "rezero": "Bachlechner et al. 2020, 'ReZero is All You Need' (enwiki8 Transformers): ReZero converges "
              "faster than the vanilla (post-norm) Transformer (56% fewer iterations to the same loss).",
    "xiong_warmup": "Xiong et al. 2020, 'On Layer Normalization in the Transformer Architecture' (IWSLT, BERT): "
                    "the post-LN Transformer needs learning-rate warm-up; without it training is worse.",
    "xiong_grads": "Xiong et al. 2020: at init the post-LN Transformer's gradients depend strongly on the layer "
                   "(large near the output); pre-LN gradients are well behaved across layers.",
    "xiong_params": "Xiong et al. 2020, Fig. 3: at init the gradient norm of the post-LN Transformer's parameters "
                    "(FFN weights) grows with the layer index; the pre-LN one stays the same across layers.",
    "reuse": "Design notes; Huang et al. 2017 (DenseNet): dense connections give maximal feature reuse; "
             "Pagliardini et al. 2024 (DenseFormer): the learnt weights on earlier blocks are far from zero.",
    "dense": "Design notes; Huang et al. 2017 (DenseNet): dense connections give maximal feature reuse but "
             "cost memory (concatenated inputs grow with depth); Pagliardini et al. 2024 (DenseFormer) keep "
             "the width fixed with weighted sums.",
    "highway_hard": "Design notes: highway networks give fine control of the information flow but are harder "
                    "to train than plain residual connections.",
    "little": "Design notes: a residual network loses little when one layer is removed.",
}


TRAINED_ACCURACY = 0.85  # a plain CNN counts as trained at a depth when every seed reaches this held out
TESTBED_LABELS = {"mlp": "toy MLP", "lm": "char Transformer", "cnn": "digits CNN"}


def seed_interval(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean over seeds and its 95% Student-t interval, (mean, low, high); one seed: a zero-width interval."""
    values = values.double()
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    half = quantile * float(values.std()) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def decide(low: float, high: float, threshold: float = 0.0) -> str:
    """holds if the interval is above `threshold`, differs if below, else unclear."""
    return "holds" if low > threshold else "differs" if high < threshold else "unclear"


def final_train_loss(study: ResidualStudy, runs: list[int]) -> torch.Tensor:
    """Mean mini-batch training loss over the last 10% of steps, one value per run [len(runs)]."""
    tail = max(1, (study.steps + 1) // 10)
    return study.train_loss[runs, -tail:].mean(-1)


def _row(claim: str, protocol: str, values: torch.Tensor, unit: str, paper: str, extra: str = "",
         threshold: float = 0.0, below: bool = False) -> Verdict:
    """One row; the claim holds when the interval lies above `threshold` (`below`: under it)."""
    value, low, high = seed_interval(values)
    number = f"{value:.3g} {unit} [{low:.3g}, {high:.3g}] over {len(values)} seeds" + (f"; {extra}" if extra else "")
    verdict = decide(-high, -low, -threshold) if below else decide(low, high, threshold)
    return Verdict(claim, protocol, number, value, low, high, PAPERS[paper], verdict)


def _have(study: ResidualStudy, *keys: tuple) -> bool:
    return all(study.runs(*key) for key in keys) and len({len(study.runs(*key)) for key in keys}) == 1


def residual_verdicts(study: ResidualStudy) -> tuple[Verdict, ...]:
    """The verdict rows that the study's runs can decide (see `PAPERS` for the claims)."""
    rows = []
    for make in (_degradation, _lesions, _highway_trains, _rezero, _warmup, _pre_norm_grads, _pre_norm_params,
                 _dense_memory, _dense_reuse, _highway_harder, _loses_little):
        row = make(study)
        if row is not None:
            rows.append(row)
    return tuple(rows)


def _degradation(study: ResidualStudy) -> Verdict | None:
    if "cnn" not in study.testbeds or len(study.cnn_depths) < 2:
        return None
    shallow, deep = min(study.cnn_depths), max(study.cnn_depths)
    gap = {v: final_train_loss(study, study.runs("cnn", v, deep))
           - final_train_loss(study, study.runs("cnn", v, shallow)) for v in ("plain", "residual")}
    return _row("Deeper plain nets train worse than shallower ones (degradation); residual nets do not",
                f"digits CNN, {deep} vs {shallow} basic blocks: final training loss (mean of the last 10% of steps), "
                f"deep minus shallow, plain",
                gap["plain"], "nats", "he", f"residual: {seed_interval(gap['residual'])[0]:.3g} nats")


def trained_cnn_depth(study: ResidualStudy) -> int | None:
    """The deepest CNN depth where the plain net reached TRAINED_ACCURACY held out in every seed (None: none did).

    The lesion test compares two trained nets: a plain net that never trained has little to lose.
    """
    def every_seed_trained(depth: int) -> bool:
        runs = study.runs("cnn", "plain", depth)
        return bool(runs) and bool((study.heldout_accuracy[runs, -1] >= TRAINED_ACCURACY).all())

    return max(filter(every_seed_trained, study.cnn_depths), default=None)


def _lesions(study: ResidualStudy) -> Verdict | None:
    if "cnn" not in study.testbeds or not study.lesions:
        return None
    trained = trained_cnn_depth(study)
    deep = max(study.cnn_depths) if trained is None else trained
    drop = {}
    for variant in ("plain", "residual"):
        runs = study.runs("cnn", variant, deep)
        drop[variant] = (study.heldout_accuracy[runs, -1:] - study.lesion_accuracy[runs]).nanmean(-1)
    if bool(drop["plain"].isnan().any()):
        return None  # no block of this depth can be deleted
    chosen = (f"the deepest where plain reaches held-out accuracy >= {TRAINED_ACCURACY:g} in every seed"
              if trained is not None else "the deepest; plain trained at none")
    row = _row("Deleting one block barely hurts a residual net and ruins a plain one",
               f"digits CNN, {deep} basic blocks ({chosen}), trained; delete each same-shape block in turn at test time; "
               f"held-out accuracy drop averaged over blocks, plain minus residual",
               100 * (drop["plain"] - drop["residual"]), "points", "veit",
               f"plain drop {100 * float(drop['plain'].mean()):.1f} points, "
               f"residual {100 * float(drop['residual'].mean()):.1f}")
    if trained is None:  # an untrained plain net has nothing to lose: the comparison cannot decide
        return dataclasses.replace(row, verdict="unclear", number=row.number + f"; plain reached held-out accuracy "
                                   f"{TRAINED_ACCURACY:g} at no depth (untrained: cannot decide)")
    return row


def _highway_trains(study: ResidualStudy) -> Verdict | None:
    deep = max(study.mlp_depths) if "mlp" in study.testbeds else 0
    if not _have(study, ("mlp", "plain", deep), ("mlp", "highway", deep)):
        return None
    plain, highway = (final_train_loss(study, study.runs("mlp", v, deep)) for v in ("plain", "highway"))
    return _row("A deep highway net trains where a plain net of the same depth does not",
                f"toy MLP, {deep} blocks (the paper: 100 layers), gate bias -2: final training loss, "
                f"plain minus highway",
                plain - highway, "(MSE)", "srivastava",
                f"highway {float(highway.mean()):.3f}, plain {float(plain.mean()):.3f} (1.0 = predicting the mean)")


def _curve_area(study: ResidualStudy, runs: list[int]) -> torch.Tensor:
    return study.train_loss[runs].mean(-1)


def _rezero(study: ResidualStudy) -> Verdict | None:
    deep = max(study.lm_depths) if "lm" in study.testbeds else 0
    if not _have(study, ("lm", "rezero", deep), ("lm", "post_norm", deep)):
        return None
    rezero, post = (_curve_area(study, study.runs("lm", v, deep)) for v in ("rezero", "post_norm"))
    extra = ""
    if _have(study, ("lm", "rezero", deep), ("lm", "pre_norm", deep)):
        pre = _curve_area(study, study.runs("lm", "pre_norm", deep))
        extra = f"vs pre-norm: {seed_interval(pre - rezero)[0]:.3g} nats"
    return _row("ReZero converges faster than the post-norm Transformer",
                f"char Transformer, {deep} blocks: mean training loss over all steps (area under the curve), "
                f"post-norm minus ReZero", post - rezero, "nats", "rezero", extra)


def _warmup(study: ResidualStudy) -> Verdict | None:
    deep = max(study.lm_depths) if "lm" in study.testbeds else 0
    if not study.warmup or not _have(study, ("lm", "post_norm", deep), ("lm", "post_norm", deep, study.warmup)):
        return None
    gain = {}
    for variant in ("post_norm", "pre_norm"):
        if _have(study, ("lm", variant, deep), ("lm", variant, deep, study.warmup)):
            gain[variant] = (study.heldout_loss[study.runs("lm", variant, deep), -1]
                             - study.heldout_loss[study.runs("lm", variant, deep, study.warmup), -1])
    extra = f"pre-norm gain: {seed_interval(gain['pre_norm'])[0]:.3g} nats" if "pre_norm" in gain else ""
    return _row("The post-norm Transformer needs learning-rate warm-up",
                f"char Transformer, {deep} blocks, Adam lr 3e-3: final held-out loss without minus with "
                f"{study.warmup} steps of linear warm-up", gain["post_norm"], "nats", "xiong_warmup", extra)


def _pre_norm_grads(study: ResidualStudy, parameters: bool = False) -> Verdict | None:
    deep = max(study.lm_depths) if "lm" in study.testbeds else 0
    if not _have(study, ("lm", "post_norm", deep), ("lm", "pre_norm", deep)):
        return None
    ratio = study.first_to_last(0, parameters).log10().abs()
    post, pre = (ratio[study.runs("lm", v, deep)] for v in ("post_norm", "pre_norm"))
    what = ("parameter gradient norm of block 0 / of the last block (all its weights)" if parameters
            else "grad norm at block 0 / at the last block")
    return _row("Pre-norm " + ("parameter " if parameters else "") + "gradients are better behaved across "
                "layers than post-norm ones at init",
                f"char Transformer, {deep} blocks, at init: |log10({what})|, post-norm minus pre-norm",
                post - pre, "decades", "xiong_params" if parameters else "xiong_grads",
                f"post-norm {float(post.mean()):.3f}, pre-norm {float(pre.mean()):.3f}")


def _pre_norm_params(study: ResidualStudy) -> Verdict | None:
    return _pre_norm_grads(study, parameters=True)


def _dense_reuse(study: ResidualStudy) -> Verdict | None:
    """On the Transformer when it ran the dense variant at its deepest depth, else on the toy MLP."""
    for testbed in ("lm", "mlp"):
        deep = max(study.config.depths(testbed)) if testbed in study.testbeds else 0
        runs = study.runs(testbed, "dense", deep)
        if runs:
            trained = study.heldout_loss[runs, -1]
            share = (study.reuse_loss[runs] - trained) / (study.heldout_loss[runs, 0] - trained)
            weight, low, high = seed_interval(study.reuse_share[runs])
            return _row("Dense connections reuse earlier features: the non-adjacent inputs carry real weight",
                        f"{TESTBED_LABELS[testbed]}, DenseFormer, {deep} blocks, trained: held-out loss increase when "
                        f"the learnt weights on non-adjacent earlier states are set to 0, as a share of what "
                        f"training gained; 'reuse matters' = above 0.1", share, "of the gain", "reuse",
                        f"share of |weight| on non-adjacent states {weight:.3f} [{low:.3f}, {high:.3f}]",
                        threshold=0.1)
    return None


def _dense_memory(study: ResidualStudy) -> Verdict | None:
    deep = max(study.mlp_depths) if "mlp" in study.testbeds else 0
    if not _have(study, ("mlp", "concat", deep), ("mlp", "pre_norm", deep)):
        return None
    saved = {v: study.saved_bytes[study.runs("mlp", v, deep)] for v in ("concat", "pre_norm", "dense")
             if study.runs("mlp", v, deep)}
    extra = (f"DenseFormer weighted sums: x{float((saved['dense'] / saved['pre_norm']).mean()):.2f}"
             if "dense" in saved else "")
    return _row("Dense (concatenated) connections cost memory",
                f"toy MLP, {deep} blocks: activation bytes saved for backward in one step (distinct storages), "
                f"concatenation / pre-norm residual (1 = the same)",
                saved["concat"] / saved["pre_norm"], "x", "dense", extra, threshold=1.0)


def _highway_harder(study: ResidualStudy) -> Verdict | None:
    deep = max(study.mlp_depths) if "mlp" in study.testbeds else 0
    if not _have(study, ("mlp", "highway", deep), ("mlp", "pre_norm", deep)):
        return None
    highway, residual = (final_train_loss(study, study.runs("mlp", v, deep)) for v in ("highway", "pre_norm"))
    return _row("Highway connections are harder to train than residual ones",
                f"toy MLP, {deep} blocks, same steps and lr: final training loss, highway minus pre-norm residual",
                highway - residual, "(MSE)", "highway_hard")


def _loses_little(study: ResidualStudy) -> Verdict | None:
    deep = max(study.lm_depths) if "lm" in study.testbeds else 0
    if not study.lesions or not _have(study, ("lm", "pre_norm", deep)):
        return None
    share = {}
    for variant in ("pre_norm", "plain"):
        runs = study.runs("lm", variant, deep)
        if runs:
            learnt = study.heldout_loss[runs, 0] - study.heldout_loss[runs, -1]
            share[variant] = study.lesion_damage()[runs].nanmean(-1) / learnt
    extra = f"plain: {float(share['plain'].mean()):.2f}" if "plain" in share else ""
    return _row("A residual network loses little when one block is removed",
                f"char Transformer, pre-norm, {deep} blocks: held-out loss increase from deleting one block (mean over "
                f"blocks) as a share of what training gained (init minus final held-out loss); 'little' = below 0.1",
                share["pre_norm"], "of the gain", "little", extra, threshold=0.1, below=True)
