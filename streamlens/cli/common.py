"""What every command shares: the Typer app, the one-line error, and the option parsers.

Only typer is imported here: `streamlens --help` must not load torch or transformer-lens.
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

MODEL_HELP = "'smollm2' (default), a .gguf file, an HF folder or a name in the local HF cache."


def fail(message: str) -> NoReturn:
    """One clear line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def main() -> None:
    """streamlens: the residual stream, measured."""


def parse_ints(option: str, text: str | None) -> list[int] | None:
    """'0-5,9' -> [0, 1, 2, 3, 4, 5, 9] (`sites.parse_numbers`); None stays None (all)."""
    if text is None:
        return None
    from streamlens.sites import parse_numbers

    try:
        return list(parse_numbers(text, option))
    except ValueError as error:
        fail(str(error))


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(f"unknown {option} {value!r}: choose from {', '.join(choices)}")
    return value


def progress_bar(console=None, transient: bool = True):
    """The rich progress bar every long command shows (description, bar, n of N, elapsed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=transient)
