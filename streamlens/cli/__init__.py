"""The `streamlens` command: parse options, call the API, write files. No maths here.

One module per command (`ablate`, `decompose`, `report`, `highway`, `check`, `layers`, `identity`, `lens`),
each registering itself on the shared Typer `app` (`common.py`) and taking the option groups it needs
(`options.py`: model, data, prompt, output; declared once). Heavy imports (torch, transformer-lens) happen inside the commands,
so `streamlens --help` is fast. Bad input prints one line naming the bad value and exits with code 2.
"""

from streamlens.cli.common import app, fail
from streamlens.cli import ablate, decompose, highway, layers, report  # noqa: F401  (each registers its command)
from streamlens.cli import check  # noqa: F401  (streamlens check)
from streamlens.cli import identity, lens  # noqa: F401  (what the stream carries: issue 13)
from streamlens.cli import prune  # noqa: F401  (streamlens prune: issue 20)
from streamlens.cli import residuals  # noqa: F401  (the residual family: issue 22)

__all__ = ["app", "fail"]
