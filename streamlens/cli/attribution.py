"""The `--estimate` path of `streamlens ablate`: estimate every unit at once (AtP / AtP*), re-measure
the top units exactly, write the estimate (marked as such) and the side-by-side check.

Called by `cli/ablate.py` after its own checks; registers no command of its own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from streamlens.cli.common import fail, progress_bar, stdout_console

if TYPE_CHECKING:
    from streamlens.cli.options import DataOptions, ModelOptions, OutputOptions, Sweep


def ablate_estimate(sweep: Sweep, model: ModelOptions, data: DataOptions, output: OutputOptions, *, estimate: str,
                    verify_top: int, verify_all: bool, started: float) -> None:
    """Run `ablation.attribute` (+ `verify`), write ablation.{csv,json,html} (+ ablation_verify.csv)."""
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

        loaded = model.load()
        batch = D.load_batch(loaded, data.source, window=data.window, max_windows=data.max_windows,
                             positions=sweep.positions)
        n_units = len(A.units(loaded, sweep.unit, sweep.layer_list, sweep.head_list))
        top = n_units if verify_all else min(verify_top, n_units)
        result, exact, agreement, seconds = _estimate_and_verify(loaded, batch, sweep, options, estimate, top)
    except (ValueError, OSError) as error:
        fail(str(error))
    seconds["total"] = time.perf_counter() - started
    _write_and_print(loaded, batch, sweep, data, output, (result, exact, agreement), estimate, top, seconds)


def _estimate_and_verify(loaded, batch, sweep: Sweep, options, estimate: str, top: int):
    """The estimate and, for the `top` units, the exact measurement, under one progress bar:
    (estimate, exact or None, agreement or None, seconds by step)."""
    from rich.console import Console

    from streamlens import ablation as A
    from streamlens.results import command_line

    command = command_line()
    n_units = len(A.units(loaded, sweep.unit, sweep.layer_list, sweep.head_list))
    n_chunks = -(-batch.n_texts // min(options.batch_size, batch.n_texts))
    with progress_bar(Console(stderr=True)) as bar:
        # steps: the estimate 1 a chunk of texts, the exact check 1 a unit and chunk
        task = bar.add_task(f"estimating {n_units} {sweep.unit} units ({estimate})", total=n_chunks * (1 + top))
        tick = time.perf_counter()
        result = A.attribute(loaded, batch, sweep.unit, sweep.method, sweep.layer_list, sweep.head_list, options,
                             estimate=estimate, progress=lambda n: bar.advance(task, n), command=command)
        seconds = {"estimate": time.perf_counter() - tick}
        exact = agreement = None
        if top:
            bar.update(task, description=f"measuring the top {top} exactly")
            tick = time.perf_counter()
            exact = A.verify(loaded, batch, result, top, options=options, command=command,
                             progress=lambda n: bar.advance(task, n))
            seconds["verify"] = time.perf_counter() - tick
            if len(exact.units) >= 3:
                agreement = A.agreement(result, exact, result.metrics[0], n_boot=options.n_boot, seed=options.seed)
    return result, exact, agreement, seconds


def _write_and_print(loaded, batch, sweep: Sweep, data: DataOptions, output: OutputOptions, measured, estimate: str,
                     top: int, seconds: dict[str, float]) -> None:
    """Write ablation.{csv,json,html} (+ ablation_verify.csv); print the table, the agreement and the times."""
    from streamlens.pages.attribution import attribution_files
    from streamlens.results import command_line

    result, exact, agreement = measured
    settings = {"command": command_line(), "unit": sweep.unit, "method": sweep.method, "effect": "total",
                "estimate": estimate, "verify_top": top, "positions": sweep.positions,
                "layers": sweep.layers or "all", "heads": sweep.heads or ("all" if sweep.unit == "head" else None),
                "window": data.window, "max_windows": data.max_windows, "batch_size": sweep.batch_size or 16,
                "bootstrap": sweep.n_boot, "seed": sweep.seed}
    try:
        files = attribution_files(result, exact, agreement, batch, loaded, settings, seconds)
    except (ValueError, OSError) as error:
        fail(str(error))
    folder = output.write(files)
    stdout_console().print(_table(result, exact))
    if agreement is not None:
        typer.echo(f"estimate vs exact over {agreement.n_units} units ({agreement.metric}): Spearman "
                   f"{agreement.spearman[0]:.3f} [{agreement.spearman[1]:.3f}, {agreement.spearman[2]:.3f}], Pearson "
                   f"{agreement.pearson[0]:.3f} [{agreement.pearson[1]:.3f}, {agreement.pearson[2]:.3f}]")
    typer.echo(f"estimate {seconds['estimate']:.1f} s" + (f", exact top {top} {seconds['verify']:.1f} s" if top else "")
               + f"; wrote {', '.join(files)} to {folder} in {seconds['total']:.1f} s")


def _table(estimate, exact):
    """The units with the largest estimate (up to 10): estimate [CI] and, when verified, exact [CI]."""
    from rich.table import Table

    from streamlens.ablation.attribute import ranking

    metric = estimate.metrics[0]
    table = Table(title=f"{metric}: estimate ({estimate.estimate}, not measured)"
                        + (" and exact" if exact is not None else "") + f"; 95% CI over {estimate.n_texts} texts")
    for column in ("unit", "estimate [95% CI]", *(("exact [95% CI]",) if exact is not None else ())):
        table.add_column(column, justify="right", no_wrap=True)
    for row in ranking(estimate)[:10]:
        cells = [estimate.units[row], _cell(estimate, row, metric)]
        if exact is not None:
            unit = estimate.units[row]
            cells.append(_cell(exact, exact.units.index(unit), metric) if unit in exact.units else "-")
        table.add_row(*cells)
    return table


def _cell(result, row: int, metric: str) -> str:
    column = result.metrics.index(metric)
    return (f"{float(result.values[row, column]):.3f} [{float(result.ci_low[row, column]):.3f}, "
            f"{float(result.ci_high[row, column]):.3f}]")
