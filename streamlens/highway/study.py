"""The residual-family study: every testbed x variant x depth x seed, trained and measured.

`residual_study(ResidualConfig(...)) -> ResidualStudy`. On top of the grid, with `warmup > 0` the
post-norm and pre-norm Transformers at the deepest `lm` depth are trained once more with a linear
learning-rate warm-up (Xiong et al. 2020). Runs are independent and deterministic: the same config
gives the same numbers (bar the step times) on every machine with the same library versions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from streamlens.highway.lesion import lesion_profile, reuse_ablation
from streamlens.highway.testbeds import Testbed, load_testbed
from streamlens.highway.toy import one_thread
from streamlens.highway.training import build_model, train_run
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


def measure_run(run: tuple[str, str, int, int, int], config: ResidualConfig, max_depth: int) -> dict[str, Any]:
    """Train and measure one run on one thread: the `RunRecord` fields, its lesion profile and (dense
    variant only, else NaN) the reuse of earlier states."""
    name, variant, depth, seed, warmup = run
    testbed = _testbed(name)
    with one_thread():
        model = build_model(testbed, variant, depth, seed)
        record = train_run(model, testbed, seed, config.steps, config.eval_steps, warmup)
        lesion_loss, lesion_accuracy = (lesion_profile(model, testbed, max_depth) if config.lesions else
                                        (torch.full((max_depth,), float("nan"), dtype=torch.float64),) * 2)
        reuse_share, reuse_loss = reuse_ablation(model, testbed)
    return {**{field: getattr(record, field) for field in record.__dataclass_fields__},
            "lesion_loss": lesion_loss, "lesion_accuracy": lesion_accuracy, "reuse_share": reuse_share,
            "reuse_loss": reuse_loss}


@functools.lru_cache(maxsize=None)
def _testbed(name: str) -> Testbed:
    return load_testbed(name)  # once per process: a worker loads each testbed it uses once


def _results(runs: list, config: ResidualConfig, max_depth: int, workers: int) -> Iterator[dict[str, Any]]:
    """Each run's measurements, in the order of `runs`; with `workers` > 1 from forked processes."""
    if workers <= 1:
        yield from (measure_run(run, config, max_depth) for run in runs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for name in config.testbeds:
        _testbed(name)  # load before forking: the workers inherit them
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(measure_run, runs, [config] * len(runs), [max_depth] * len(runs))


def residual_study(config: ResidualConfig = ResidualConfig(),
                   on_run: Callable[[tuple[str, str, int, int, int]], None] | None = None,
                   command: str | None = None, workers: int = 1) -> ResidualStudy:
    """Train and measure every run of `plan(config)`; `on_run(run)` is called after each (progress).

    `workers` > 1 trains runs in that many forked processes, one thread each; every run seeds itself,
    so the numbers do not depend on `workers` (only the step times do).
    """
    started = time.perf_counter()
    runs = plan(config)
    max_depth = max(run[2] for run in runs)
    n_eval = len(config.eval_steps)
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=torch.float64)  # noqa: E731
    table = {"train_loss": nan(len(runs), config.steps + 1), "heldout_loss": nan(len(runs), n_eval),
             "heldout_accuracy": nan(len(runs), n_eval), "grad_norm": nan(len(runs), n_eval, max_depth),
             "param_grad_norm": nan(len(runs), n_eval, max_depth), "reuse_share": nan(len(runs)),
             "reuse_loss": nan(len(runs)),
             "lesion_loss": nan(len(runs), max_depth), "lesion_accuracy": nan(len(runs), max_depth),
             "saved_bytes": torch.zeros(len(runs), dtype=torch.float64), "step_seconds": nan(len(runs))}
    for r, measured in enumerate(_results(runs, config, max_depth, workers)):
        for field in ("grad_norm", "param_grad_norm"):
            table[field][r, :, : runs[r][2]] = measured.pop(field)
        for field, value in measured.items():
            table[field][r] = value
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
