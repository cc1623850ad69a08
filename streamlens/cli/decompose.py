"""`streamlens decompose`: the exact split of one next-token logit, as a table (and a tidy CSV)."""

from __future__ import annotations

import typer

from streamlens.cli.common import MODEL_HELP, THREADS_HELP, VERIFY_HELP, app, check_out, fail, use_threads


@app.command()
def decompose(
    prompt: str = typer.Option("The capital of France is", "--prompt", help="The prompt to explain."),
    target: str = typer.Option(None, "--target", help="Token to explain, e.g. ' Paris' (default: top prediction)."),
    contrast: str = typer.Option(None, "--contrast", help="Explain logit(target) - logit(contrast) instead."),
    position: int = typer.Option(-1, "--position", help="Token position (negative counts from the end)."),
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64 (bfloat16 cannot keep the exact sum)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    out: str = typer.Option(None, "--out", help="Also write the tidy table to this .csv file."),
) -> None:
    """Split one next-token logit exactly into embedding, attention, MLP and bias contributions."""
    if dtype == "bfloat16":  # refused before loading: its 8-bit mantissa breaks the exact sum
        fail("--dtype bfloat16 is not offered by decompose: the contributions must sum exactly; use float32 or "
             "float64")
    path = None if out is None else check_out(out, ".csv")
    try:
        from rich.console import Console
        from rich.table import Table

        from streamlens.decomposition import decompose as run_decompose
        from streamlens.files import write_outputs
        from streamlens.model import load_model

        use_threads(threads)
        loaded = load_model(model, dtype=dtype, device=device, verify=verify)
        parts = run_decompose(loaded, prompt, target=target, contrast=contrast, positions=position)
        if path is not None:  # one file, one set: replaced whole, never half-written
            write_outputs(path.parent, {path.name: parts.to_dataframe().to_csv(index=False)}, set_name=path.name)
    except (ValueError, OSError) as error:
        fail(str(error))
    values = parts.contributions[:, 0, 0].tolist()
    by_label = dict(zip(parts.labels, values))
    table = Table(title=f"{parts.target_strings[0][0]} after {prompt!r} (position {parts.positions[0]})")
    for column in ("layer", "attention", "MLP", "running total"):
        table.add_column(column, justify="right")
    table.add_row("embed", f"{by_label['embed'] + by_label.get('pos_embed', 0.0):+.4f}", "",
                  f"{float(parts.accumulated[0, 0, 0]):+.4f}")
    for layer in range(loaded.n_layers):
        table.add_row(str(layer), f"{by_label[f'attn {layer}']:+.4f}", f"{by_label[f'mlp {layer}']:+.4f}",
                      f"{float(parts.accumulated[layer + 1, 0, 0]):+.4f}")
    table.add_row("norm bias", f"{by_label['norm bias']:+.4f}", "", "")
    table.add_row("unembed bias", f"{by_label['unembed bias']:+.4f}", "", "")
    console = Console()
    console.print(table)
    total, real = float(parts.total[0, 0]), float(parts.logits[0, 0])
    console.print(f"sum of contributions {total:.6f}   real logit {real:.6f}   |error| {abs(total - real):.2e}")
