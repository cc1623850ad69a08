"""The residual-family study: every testbed x variant x depth x seed, trained and measured.

`residual_study(ResidualConfig(...)) -> ResidualStudy`. On top of the grid, with `warmup > 0` the
post-norm and pre-norm Transformers at the deepest `lm` depth are trained once more with a linear
learning-rate warm-up (Xiong et al. 2020). Runs are independent and deterministic: the same config
gives the same numbers (bar the step times) on every machine with the same library versions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from streamlens.highway.lesion import lesion_profile
from streamlens.highway.testbeds import load_testbed
from streamlens.highway.training import build_model, one_thread, train_run
from streamlens.results import Provenance, command_line, package_version
from streamlens.results.residuals import ResidualConfig, ResidualStudy

WARMUP_VARIANTS = ("post_norm", "pre_norm")


def plan(config: ResidualConfig) -> list[tuple[str, str, int, int, int]]:
    """Every run as (testbed, variant, depth, seed, warmup), in the order they are trained."""
    runs = []
    for testbed in config.testbeds:
        for depth in config.depths(testbed):
            for variant in config.testbed_variants(testbed):
                runs += [(testbed, variant, depth, seed, 0) for seed in config.seeds]
    if config.warmup and "lm" in config.testbeds:
        deepest = max(config.lm_depths)
        runs += [("lm", variant, deepest, seed, config.warmup) for variant in WARMUP_VARIANTS
                 if variant in config.lm_variants for seed in config.seeds]
    return runs


def work(run: tuple[str, str, int, int, int], config: ResidualConfig) -> int:
    """A rough cost of one run in block-steps (for progress bars)."""
    return run[2] * (config.steps + 1) * (2 if run[0] == "lm" else 1)


def residual_study(config: ResidualConfig = ResidualConfig(),
                   on_run: Callable[[tuple[str, str, int, int, int]], None] | None = None,
                   command: str | None = None) -> ResidualStudy:
    """Train and measure every run of `plan(config)`; `on_run(run)` is called after each (progress)."""
    started = time.perf_counter()
    runs = plan(config)
    max_depth = max(run[2] for run in runs)
    n_eval = len(config.eval_steps)
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=torch.float64)  # noqa: E731
    table = {"train_loss": nan(len(runs), config.steps + 1), "heldout_loss": nan(len(runs), n_eval),
             "heldout_accuracy": nan(len(runs), n_eval), "grad_norm": nan(len(runs), n_eval, max_depth),
             "lesion_loss": nan(len(runs), max_depth), "lesion_accuracy": nan(len(runs), max_depth),
             "saved_bytes": torch.zeros(len(runs), dtype=torch.float64), "step_seconds": nan(len(runs))}
    testbeds = {name: load_testbed(name) for name in config.testbeds}
    with one_thread():
        for r, (name, variant, depth, seed, warmup) in enumerate(runs):
            testbed = testbeds[name]
            model = build_model(testbed, variant, depth, seed)
            record = train_run(model, testbed, seed, config.steps, config.eval_steps, warmup)
            for field in ("train_loss", "heldout_loss", "heldout_accuracy"):
                table[field][r] = getattr(record, field)
            table["grad_norm"][r, :, :depth] = record.grad_norm
            table["lesion_loss"][r], table["lesion_accuracy"][r] = lesion_profile(model, testbed, max_depth)
            table["saved_bytes"][r], table["step_seconds"][r] = record.saved_bytes, record.step_seconds
            if on_run is not None:
                on_run(runs[r])
    labels = dict(zip(("run_testbed", "run_variant", "run_depth", "run_seed", "run_warmup"),
                      (tuple(column) for column in zip(*runs))))
    versions = {p: package_version(p) for p in ("streamlens", "torch", "scikit-learn")}
    provenance = Provenance(model="residual-family testbeds (mlp, lm, cnn)", weights_hash="", dtype="float64/float32",
                            device="cpu", command=command or command_line(), seed=config.seeds[0], versions=versions,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    settings = {field: getattr(config, field) for field in config.__dataclass_fields__}
    return ResidualStudy(provenance=provenance, **settings, **labels, **table,
                         seconds=time.perf_counter() - started)
