"""`streamlens --help` must stay fast: the CLI module must not import torch or transformer-lens."""

from __future__ import annotations

import subprocess
import sys


def test_cli_import_is_light():
    code = "import sys, streamlens.cli; print(sorted(m for m in ('torch', 'transformer_lens', 'transformers', 'pandas', 'plotly') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "streamlens", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("ablate", "decompose", "report", "highway"):
        assert command in out.stdout
