"""`streamlens check [MODEL]`: is streamlens exact on this model? One table; exit 0 only when all hold."""

from __future__ import annotations

import typer

from streamlens.cli.common import MODEL_HELP, app, fail


@app.command()
def check(
    model: str = typer.Argument(None, help=MODEL_HELP),
    model_option: str = typer.Option(None, "--model", help="The same as the MODEL argument."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    out: str = typer.Option(None, "--out", help="Also write check.csv and check.json (provenance) to this folder."),
) -> None:
    """Load a model and check that streamlens is exact on it: bridge vs HF logits, the write identity,
    the decomposition, per-head sums and an ablation spot check. Exit 0 when all hold, 1 when one
    fails, 2 when the model cannot be loaded at all (e.g. a family the bridge cannot run)."""
    import json

    from rich.console import Console

    if model is not None and model_option is not None and model != model_option:
        fail(f"two models given: {model!r} and --model {model_option!r}; give one")
    name = model if model is not None else model_option
    try:
        from streamlens.files import check_out_dir, write_outputs

        if out is not None:
            check_out_dir(out)
        from streamlens.exactness import check_model
        from streamlens.model import load_model

        loaded = load_model(name, dtype=dtype, device=device, strict=False)  # the table shows any difference
        result = check_model(loaded)
    except (ValueError, OSError) as error:
        fail(str(error))
    Console().print(check_table(result))
    if loaded.info.fidelity:
        typer.echo(loaded.info.fidelity, err=True)
    if out is not None:
        from dataclasses import asdict

        summary = {"model": result.provenance.model, "family": result.family, "passed": result.passed,
                   "provenance": asdict(result.provenance),
                   "checks": result.to_dataframe().to_dict(orient="records")}
        try:
            write_outputs(out, {"check.csv": result.to_dataframe().to_csv(index=False),
                                "check.json": json.dumps(summary, indent=2)})
        except (ValueError, OSError) as error:
            fail(str(error))
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
