"""`streamlens decompose`: the exact split of one next-token logit, as a table (and a tidy CSV)."""

from __future__ import annotations

import typer

from streamlens.cli.common import app, fail
from streamlens.cli.options import (EXACT_DTYPES, ModelOptions, OutputOptions, PromptOptions, model_group,
                                    output_group, prompt_group, uses)


@app.command()
@uses(prompt=prompt_group(), model=model_group(dtypes=EXACT_DTYPES, why="bfloat16 cannot keep the exact sum"),
      output=output_group(default=None, help="Also write the tidy table to this .csv file.", suffix=".csv"))
def decompose(
    prompt: PromptOptions,
    contrast: str = typer.Option(None, "--contrast", help="Explain logit(target) - logit(contrast) instead."),
    position: int = typer.Option(-1, "--position", help="Token position (negative counts from the end)."),
    model: ModelOptions = None,
    output: OutputOptions = None,
) -> None:
    """Split one next-token logit exactly into embedding, attention, MLP and bias contributions."""
    try:
        from streamlens.decomposition import decompose as run_decompose

        model.set_threads()
        loaded = model.load()
        parts = run_decompose(loaded, prompt.prompt, target=prompt.target, contrast=contrast, positions=position)
    except (ValueError, OSError) as error:
        fail(str(error))
    if output.out is not None:  # one file, one set: replaced whole, never half-written
        output.write({"table.csv": parts.to_dataframe().to_csv(index=False)})
    _print(parts, prompt.prompt, loaded.n_layers)


def _print(parts, prompt: str, n_layers: int) -> None:
    """The contributions by layer (attention, MLP, running total) and the sum against the real logit."""
    from rich.table import Table

    from streamlens.cli.common import stdout_console

    values = parts.contributions[:, 0, 0].tolist()
    by_label = dict(zip(parts.labels, values))
    table = Table(title=f"{parts.target_strings[0][0]} after {prompt!r} (position {parts.positions[0]})")
    for column in ("layer", "attention", "MLP", "running total"):
        table.add_column(column, justify="right")
    table.add_row("embed", f"{by_label['embed'] + by_label.get('pos_embed', 0.0):+.4f}", "",
                  f"{float(parts.accumulated[0, 0, 0]):+.4f}")
    for layer in range(n_layers):
        table.add_row(str(layer), f"{by_label[f'attn {layer}']:+.4f}", f"{by_label[f'mlp {layer}']:+.4f}",
                      f"{float(parts.accumulated[layer + 1, 0, 0]):+.4f}")
    table.add_row("norm bias", f"{by_label['norm bias']:+.4f}", "", "")
    table.add_row("unembed bias", f"{by_label['unembed bias']:+.4f}", "", "")
    console = stdout_console()
    console.print(table)
    total, real = float(parts.total[0, 0]), float(parts.logits[0, 0])
    console.print(f"sum of contributions {total:.6f}   real logit {real:.6f}   |error| {abs(total - real):.2e}")
