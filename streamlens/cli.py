"""The `streamlens` command: parse options, call the API, write files. No maths here.

Heavy imports (torch, transformer-lens) happen inside the commands, so `streamlens --help` is fast.
Bad input prints one line naming the bad value and exits with code 2.
"""

from __future__ import annotations

from typing import NoReturn

import typer

app = typer.Typer(
    name="streamlens",
    help="Measure the Transformer residual stream: record writes, decompose logits, ablate layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> NoReturn:
    """One clear line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def main() -> None:
    """streamlens: the residual stream, measured."""


# ----- ablate (issue 4) --------------------------------------------------------------------------

# ----- report (issue 5) --------------------------------------------------------------------------

@app.command()
def report(
    model: str = typer.Option(None, "--model", help="'smollm2' (default), a .gguf file or an HF folder."),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to decompose and lens."),
    target: str = typer.Option(None, "--target", help="Next token to explain, e.g. ' Paris' (default: top prediction)."),
    data: str = typer.Option(None, "--data", help="Data set for the ablation sweep (default: the built-in one)."),
    out: str = typer.Option("streamlens-out/report.html", "--out", help="The HTML file to write."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
) -> None:
    """Write one self-contained HTML report (plotly.js inside; opens offline) with every standard figure."""
    import time

    started = time.perf_counter()
    try:
        from streamlens.model import load_model
        from streamlens.report import check_out_path, standard_report

        path = check_out_path(out)
        loaded = load_model(model, dtype=dtype, device=device)
        written = standard_report(loaded, prompt=prompt, target=target, data=data).write(path)
    except (ValueError, OSError) as error:
        fail(str(error))
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")


# ----- highway (issue 6) -------------------------------------------------------------------------
