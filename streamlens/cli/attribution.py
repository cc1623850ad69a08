"""The `--estimate` path of `streamlens ablate`: estimate every unit at once (AtP, AtP*, integrated
gradients, second order), re-measure the top units exactly or settle the exact top K
(`--exact-top`), write the estimate (marked as such, row by row) and the checks.

Called by `cli/ablate.py` after its own checks; registers no command of its own. Its options are
declared here (`ESTIMATE`, `IG_STEPS`, `EXACT_TOP`) so that `ablate` only lists them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from streamlens.cli.common import fail, progress_bar, stdout_console

if TYPE_CHECKING:
    from streamlens.cli.options import DataOptions, ModelOptions, OutputOptions, Sweep

ESTIMATE = typer.Option("none", "--estimate", help="none (measure each unit); atp: estimate every unit at once from "
                        "one forward and backward pass (attribution patching); atp-qk, atpstar: with AtP*'s fixes; "
                        "ig: integrated gradients over --ig-steps points of the clean -> ablated path; "
                        "second-order: AtP plus the path's second-order term; local: exact through the unit's own "
                        "block, first order after (docs/estimates.md).")
IG_STEPS = typer.Option(1, "--ig-steps", help="With --estimate ig: N points of the path (left rule; 1 = atp); "
                        "an even N also gives each row an error bar |IG(N) - IG(N/2)|.")
EXACT_TOP = typer.Option(0, "--exact-top", help="With --estimate: measure the top K by estimate and 19 random units "
                         "exactly, then units in the order of their conformal upper bound until the exact top K is "
                         "settled (docs/estimates.md: the rule and its guarantee); rows are marked exact or estimate.")


def check_estimate_options(estimate: str, ig_steps: int, exact_top: int, verify_top: int, verify_all: bool) -> None:
    """Exit 2 on estimator options that do not go together (before any model is loaded)."""
    from streamlens import ablation as A
    from streamlens.ablation.attribute import check_estimate
    from streamlens.cli.common import check_choice

    if check_choice("--estimate", estimate, ("none", *A.ESTIMATES)) == "none" and (verify_top or verify_all
                                                                                   or exact_top):
        fail("--verify-top / --verify-all / --exact-top check an estimate: add --estimate ig (or atp, atp-qk, "
             "atpstar, second-order)")
    if ig_steps != 1 and estimate != "ig":
        fail(f"--ig-steps {ig_steps} applies to --estimate ig only (got --estimate {estimate})")
    try:
        check_estimate(estimate if estimate != "none" else "ig", ig_steps)
    except ValueError as error:
        fail(f"--ig-steps: {error}")
    if exact_top < 0:
        fail(f"--exact-top {exact_top} must be at least 1 (0: off)")
    if exact_top and (verify_top or verify_all):
        fail("--exact-top measures the units it needs itself: drop --verify-top / --verify-all")


def ablate_estimate(sweep: Sweep, model: ModelOptions, data: DataOptions, output: OutputOptions, *, estimate: str,
                    ig_steps: int, exact_top: int, verify_top: int, verify_all: bool, started: float) -> None:
    """Run `ablation.attribute` (+ `verify` or `exact_top`), write ablation.{csv,json,html} (+ ablation_verify.csv)."""
    from rich.console import Console

    from streamlens import ablation as A

    if sweep.effect != "total":
        fail(f"--effect {sweep.effect!r} with --estimate {estimate!r}: the estimate is of the total effect "
             f"(use --effect total)")
    if sweep.cumulative != "none":
        fail(f"--cumulative {sweep.cumulative!r} with --estimate {estimate!r}: cumulative removal is measured, not "
             f"estimated (use --cumulative none)")
    if verify_top < 0:
        fail(f"--verify-top {verify_top} must be at least 0")
    for name in sweep.metrics or ():
        if name not in A.GRADIENT_METRICS:
            fail(f"metric {name!r} has no useful gradient at the clean model: --estimate covers "
                 f"{', '.join(A.GRADIENT_METRICS)}")
    options = A.EvalOptions(metrics=sweep.metrics, seed=sweep.seed, batch_size=sweep.batch_size or 16,
                            n_boot=sweep.n_boot, threads=model.set_threads())
    try:
        from streamlens import data as D
        from streamlens.pages.attribution import attribution_files
        from streamlens.results import command_line

        loaded = model.load()
        batch = D.load_batch(loaded, data.source, window=data.window, max_windows=data.max_windows,
                             positions=sweep.positions)
        command = command_line()
        n_units = len(A.units(loaded, sweep.unit, sweep.layer_list, sweep.head_list))
        top = n_units if verify_all else min(verify_top, n_units)
        with progress_bar(Console(stderr=True)) as bar:
            result, exact, agreement, run, seconds = _measure(
                A, bar, loaded, batch, options, unit=sweep.unit, method=sweep.method, layers=sweep.layer_list,
                heads=sweep.head_list, estimate=estimate, ig_steps=ig_steps, top=top, exact_top=exact_top,
                command=command)
        seconds["total"] = time.perf_counter() - started
        settings = {"command": command, "unit": sweep.unit, "method": sweep.method, "effect": "total",
                    "estimate": result.estimate, "verify_top": top, "exact_top": _top_summary(run),
                    "positions": sweep.positions, "layers": sweep.layers or "all",
                    "heads": sweep.heads or ("all" if sweep.unit == "head" else None), "window": data.window,
                    "max_windows": data.max_windows, "batch_size": options.batch_size, "bootstrap": options.n_boot,
                    "seed": options.seed}
        if run is not None:
            result = run.result
        files = attribution_files(result, exact, agreement, batch, loaded, settings, seconds)
    except (ValueError, OSError) as error:
        fail(str(error))
    folder = output.write(files)
    _print(result, exact, agreement, run, exact_top, top, seconds, f"wrote {', '.join(files)} to {folder}")


def _print(result, exact, agreement, run, exact_top: int, top: int, seconds: dict, wrote: str) -> None:
    """The table of the largest estimates, the agreement, the exact top K and the timings."""
    stdout_console().print(_table(result, exact))
    if agreement is not None:
        typer.echo(f"estimate vs exact over {agreement.n_units} units ({agreement.metric}): Spearman "
                   f"{agreement.spearman[0]:.3f} [{agreement.spearman[1]:.3f}, {agreement.spearman[2]:.3f}], Pearson "
                   f"{agreement.pearson[0]:.3f} [{agreement.pearson[1]:.3f}, {agreement.pearson[2]:.3f}]")
    if run is not None:
        typer.echo(f"exact top {exact_top}: {', '.join(run.top)}; {run.evaluations} exact evaluations of "
                   f"{run.n_units} units ({run.evaluations / run.n_units:.0%} of the full sweep), "
                   + (f"settled by the conformal bound (q {run.quantile:.3g}, alpha {run.alpha:g}, "
                      f"{len(run.calibration)} random units)" if run.settled else "never settled: every unit measured"))
    typer.echo(f"estimate {seconds['estimate']:.1f} s" + (f", exact top {top} {seconds['verify']:.1f} s" if top else "")
               + (f", exact top {exact_top} {seconds['exact_top']:.1f} s" if run is not None else "")
               + f"; {wrote} in {seconds['total']:.1f} s")


def _measure(A: Any, bar: Any, loaded: Any, batch: Any, options: Any, *, unit: str, method: str, layers: Any,
             heads: Any, estimate: str, ig_steps: int, top: int, exact_top: int, command: str) -> tuple:
    """The estimate, then (with `top`) its verification and agreement, or (with `exact_top`) the
    exact-top-K run: (result, exact, agreement, run, seconds)."""
    n_units = len(A.units(loaded, unit, layers, heads))
    n_chunks = -(-batch.n_texts // min(options.batch_size, batch.n_texts))
    # steps: the estimate 1 a chunk of texts, the exact check 1 a unit and chunk
    task = bar.add_task(f"estimating {n_units} {unit} units ({estimate})",
                        total=n_chunks * (1 + (n_units if exact_top else top)))
    tick = time.perf_counter()
    result = A.attribute(loaded, batch, unit, method, layers, heads, options, estimate=estimate, steps=ig_steps,
                         progress=lambda n: bar.advance(task, n), command=command)
    seconds = {"estimate": time.perf_counter() - tick}
    exact = agreement = run = None
    if top:
        bar.update(task, description=f"measuring the top {top} exactly")
        tick = time.perf_counter()
        exact = A.verify(loaded, batch, result, top, options=options, command=command,
                         progress=lambda n: bar.advance(task, n))
        seconds["verify"] = time.perf_counter() - tick
        if len(exact.units) >= 3:
            agreement = A.agreement(result, exact, result.metrics[0], n_boot=options.n_boot, seed=options.seed)
    if exact_top:
        if exact_top > n_units:
            raise ValueError(f"--exact-top {exact_top} is more than the {n_units} {unit} units")
        bar.update(task, description=f"settling the exact top {exact_top}")
        tick = time.perf_counter()
        run = A.exact_top(loaded, batch, result, exact_top, options=options, command=command,
                          progress=lambda n: bar.advance(task, n))
        seconds["exact_top"] = time.perf_counter() - tick
    return result, exact, agreement, run, seconds


def _top_summary(run: Any) -> dict | None:
    if run is None:
        return None
    return {"k": len(run.top), "top": list(run.top), "evaluations": run.evaluations, "units": run.n_units,
            "calibration": list(run.calibration), "quantile": run.quantile, "alpha": run.alpha, "settled": run.settled}


def _table(estimate, exact):
    """The units with the largest estimate (up to 10): estimate [CI] (its error bar, and whether the row
    was measured exactly, when known) and, when verified, exact [CI]."""
    from rich.table import Table

    from streamlens.ablation.attribute import ranking

    metric = estimate.metrics[0]
    column = estimate.metrics.index(metric)
    table = Table(title=f"{metric}: estimate ({estimate.estimate}, not measured)"
                        + (" and exact" if exact is not None else "") + f"; 95% CI over {estimate.n_texts} texts")
    extra = (("error bar",) if estimate.error_bar is not None else ()) + (("source",) if estimate.measured is not None
                                                                         else ())
    for name in ("unit", "estimate [95% CI]", *extra, *(("exact [95% CI]",) if exact is not None else ())):
        table.add_column(name, justify="right", no_wrap=True)
    for row in ranking(estimate)[:10]:
        cells = [estimate.units[row], _cell(estimate, row, metric)]
        if estimate.error_bar is not None:
            cells.append(f"{float(estimate.error_bar[row, column]):.3f}")
        if estimate.measured is not None:
            cells.append("exact" if bool(estimate.measured[row]) else "estimate")
        if exact is not None:
            unit = estimate.units[row]
            cells.append(_cell(exact, exact.units.index(unit), metric) if unit in exact.units else "-")
        table.add_row(*cells)
    return table


def _cell(result, row: int, metric: str) -> str:
    column = result.metrics.index(metric)
    return (f"{float(result.values[row, column]):.3f} [{float(result.ci_low[row, column]):.3f}, "
            f"{float(result.ci_high[row, column]):.3f}]")
