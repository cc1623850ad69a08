"""What every command shares: the Typer app, the one-line error, and the option parsers.

Only typer is imported here: `streamlens --help` must not load torch or transformer-lens.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from streamlens.limits import MIN_BOOTSTRAP, check_n_boot

# click's error classes as typer uses them (typer may ship its own copy of click): found from a public name
_USAGE_ERROR = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
_CLICK_ERROR = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "ClickException")

class _OneErrorForm(_CLICK_ERROR):  # type: ignore[misc, valid-type]
    """A usage error of click's (bad option, bad value) shown as ours: 'error: ...', lower case like `fail`."""

    def __init__(self, error: Any) -> None:
        super().__init__(error.format_message())
        self.error, self.exit_code = error, error.exit_code

    def show(self, file: Any = None) -> None:
        import io

        buffer = io.StringIO()
        self.error.show(buffer)
        text = buffer.getvalue()
        typer.echo(text[len("Error: "):] if text.startswith("Error: ") else text.replace("\nError: ", "\nerror: "),
                   err=True, nl=False)


class _Group(TyperGroup):
    """The app's command group: click's own errors say 'error:' as `fail` does."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _USAGE_ERROR as error:
            raise _OneErrorForm(error) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as error:
            raise _OneErrorForm(error) from None


app = typer.Typer(
    cls=_Group,
    name="streamlens",
    help="Measure the Transformer residual stream: record writes, decompose logits, ablate layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "pip install 'streamlens[ray]'" must keep its [ray]
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


BOOTSTRAP = typer.Option(1000, "--bootstrap", help=f"Bootstrap replicates for the 95% CIs (over texts; at least "
                         f"{MIN_BOOTSTRAP}).")  # every command's --bootstrap; checked with check_bootstrap


def check_bootstrap(n_boot: int) -> int:
    """`limits.check_n_boot`, the one bootstrap rule of every command, before any heavy import (bad: exit 2)."""
    try:
        return check_n_boot(n_boot)
    except ValueError as error:
        fail(str(error))


def check_at_least(*checks: tuple[str, int | None, int]) -> None:
    """Fail on the first (option, value, least) whose value is below its least (None: not given, fine)."""
    for option, value, least in checks:
        if value is not None and value < least:
            fail(f"{option} {value} must be at least {least}")


def check_out(out: str, file_suffix: str | None = None):
    """Check, creating nothing, that `--out` can be written (a folder, or a file with `file_suffix`)."""
    from pathlib import Path

    from streamlens.files import check_out_dir

    try:
        if file_suffix is not None:
            path = Path(out)
            if path.is_dir():
                fail(f"--out {out} is a folder: give a file path ending in {file_suffix}")
            if not out.strip() or path.suffix.lower() != file_suffix:
                fail(f"--out {out!r} is not a {file_suffix} file: give a path ending in {file_suffix}")
            check_out_dir(path.parent if str(path.parent) else ".")
            return path
        return check_out_dir(out)
    except ValueError as error:
        fail(str(error))


def default_threads() -> int:
    """The usable cores that are idle now (at least 1): torch's default of every core slows a forward
    ~10x when another process holds one of them. Busy = the share of the last 0.1 s that this process's
    CPUs spent working (/proc/stat, Linux); elsewhere the 1-minute load average stands in."""
    import os
    import time

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    first = _cpu_times(cpus)
    time.sleep(0.1)
    second = _cpu_times(cpus)
    if first and second:
        busy = sum(1 - (second[c][1] - first[c][1]) / max(1, second[c][0] - first[c][0]) for c in second if c in first)
    else:
        try:
            busy = os.getloadavg()[0]
        except (OSError, AttributeError):
            busy = 0.0
    return max(1, len(cpus) - round(busy))


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """cpu -> (total, idle) jiffies from /proc/stat ({} where there is none)."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields]
            times[int(name[3:])] = (sum(values[:8]), values[3] + values[4])  # idle + iowait
    return times


def stdout_console():
    """The console for a command's tables: the terminal's width, or unlimited when stdout is a file or a
    pipe (rich would cut every value to 80 columns: '7.5e-…')."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000)
