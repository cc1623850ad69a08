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

# ----- highway (issue 6) -------------------------------------------------------------------------
