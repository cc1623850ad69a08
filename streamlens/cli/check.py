"""`streamlens check [MODEL]`: is streamlens exact on this model? One table; exit 0 only when all hold."""

from __future__ import annotations

import typer

from streamlens.cli.common import MODEL_HELP, app, fail, stdout_console
from streamlens.cli.options import EXACT_DTYPES, ModelOptions, OutputOptions, model_group, output_group, uses


@app.command()
@uses(model=model_group(dtypes=EXACT_DTYPES, why="the decomposition check needs an exact sum"),
      output=output_group(default=None, help="Also write check.csv and check.json (provenance) to this folder."))
def check(
    name: str = typer.Argument(None, help=MODEL_HELP, metavar="[MODEL]"),
    model: ModelOptions = None,
    output: OutputOptions = None,
) -> None:
    """Load a model and check that streamlens is exact on it: bridge vs HF logits, the write identity,
    the decomposition, per-head sums and an ablation spot check. Exit 0 when all hold, 1 when one
    fails, 2 when the model cannot be loaded at all (e.g. a family the bridge cannot run)."""
    if name is not None and model.name is not None and name != model.name:
        fail(f"two models given: {name!r} and --model {model.name!r}; give one")
    try:
        from streamlens.exactness import check_model

        model.set_threads()
        loaded = model.load(name, strict=False)  # the table shows any difference
        result = check_model(loaded)
    except (ValueError, OSError) as error:
        fail(str(error))
    stdout_console().print(check_table(result))
    if loaded.info.fidelity:
        typer.echo(loaded.info.fidelity, err=True)
    if output.out is not None:
        import json
        from dataclasses import asdict

        summary = {"model": result.provenance.model, "family": result.family, "passed": result.passed,
                   "provenance": asdict(result.provenance),
                   "checks": result.to_dataframe().to_dict(orient="records")}
        output.write({"check.csv": result.to_dataframe().to_csv(index=False),
                      "check.json": json.dumps(summary, indent=2)})
    raise typer.Exit(code=0 if result.passed else 1)


def check_table(result):
    """One row: family, norm, each check's error (red when over its tolerance), load time, verdict."""
    from rich.table import Table

    verdict = "[green]exact[/green]" if result.passed else "[red]NOT exact[/red]"
    table = Table(title=f"streamlens check: {result.provenance.model} ({result.dtype}): {verdict}")
    for column in ("family", "norm", *result.checks, "load s"):
        table.add_column(column, justify="right" if column not in ("family", "norm") else "left")
    cells = []
    for error, tolerance, ok in zip(result.errors.tolist(), result.tolerances.tolist(), result.ok.tolist()):
        text = f"{error:.1e}"
        cells.append(text if ok else f"[red]{text} > {tolerance:.0e}[/red]")
    table.add_row(result.family, result.norm_kind, *cells, f"{result.load_seconds:.1f}")
    table.caption = "relative errors (ablation: nats); tolerances " + ", ".join(
        f"{name} {tolerance:.0e}" for name, tolerance in zip(result.checks, result.tolerances.tolist()))
    return table
