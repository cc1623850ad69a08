"""`python -m streamlens` is the `streamlens` command."""

from streamlens.cli import app

app(prog_name="streamlens")
