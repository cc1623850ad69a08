"""The HTML page every command writes: a titled list of figures with the facts that explain them.

`Report.to_html` embeds plotly.js once, so a page opens offline; `Report.write` writes it atomically.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px;
       color: #222; }
h1 { margin: 28px 0 4px; } h2 { margin: 40px 0 4px; border-top: 1px solid #ddd; padding-top: 20px; }
p.caption { margin: 4px 0 8px; max-width: 900px; line-height: 1.45; }
table.facts { border-collapse: collapse; font-size: 14px; margin: 12px 0; }
table.facts td { padding: 2px 14px 2px 0; vertical-align: top; } table.facts td:first-child { color: #666; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
nav ol { line-height: 1.6; } .figure { width: 100%; }
"""


@dataclass(frozen=True)
class Section:
    """One figure of the report with a heading and a caption that says what it shows."""

    title: str
    caption: str
    figure: "go.Figure"


@dataclass(frozen=True)
class Report:
    """A titled list of figures plus the facts (model, data, command) that explain them."""

    title: str
    facts: tuple[tuple[str, str], ...]
    sections: tuple[Section, ...]

    def to_html(self) -> str:
        """One HTML page; plotly.js is embedded once in the head, every figure is a div after it."""
        from plotly.offline import get_plotlyjs

        facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in self.facts)
        toc = "".join(f'<li><a href="#figure-{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        body = []
        for index, section in enumerate(self.sections):
            div = section.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{index}",
                                         config={"displaylogo": False, "responsive": True})
            body.append(f'<section id="figure-{index}"><h2>{index + 1}. {html.escape(section.title)}</h2>'
                        f'<p class="caption">{section.caption}</p><div class="figure">{div}</div></section>')
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1><table class=\"facts\">{facts}</table>"
            f"<nav><ol>{toc}</ol></nav>{''.join(body)}</body></html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the page atomically (a failure leaves no file)."""
        from streamlens.files import prepare_out_dir, write_atomic

        prepare_out_dir(Path(path).parent)
        return write_atomic(path, self.to_html())


def fidelity_fact(info) -> str:
    """The header line saying whether the bridge computed the model's own logits (see model.fidelity)."""
    return info.fidelity or f"bridge logits = HF logits to {info.bridge_vs_hf:.1e} of the logit scale"
