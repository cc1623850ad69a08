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


# ----- decompose (issue 3) -----------------------------------------------------------------------

@app.command()
def decompose(
    prompt: str = typer.Option("The capital of France is", "--prompt", help="The prompt to explain."),
    target: str = typer.Option(None, "--target", help="Token to explain, e.g. ' Paris' (default: top prediction)."),
    contrast: str = typer.Option(None, "--contrast", help="Explain logit(target) - logit(contrast) instead."),
    position: int = typer.Option(-1, "--position", help="Token position (negative counts from the end)."),
    model: str = typer.Option(None, "--model", help="'smollm2' (default), a .gguf file, an HF folder or name."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    out: str = typer.Option(None, "--out", help="Also write the tidy table to this CSV file."),
) -> None:
    """Split one next-token logit exactly into embedding, attention, MLP and bias contributions."""
    from rich.console import Console
    from rich.table import Table

    try:
        from streamlens.decomposition import decompose as run_decompose
        from streamlens.files import write_atomic
        from streamlens.model import load_model

        loaded = load_model(model, dtype=dtype, device=device)
        parts = run_decompose(loaded, prompt, target=target, contrast=contrast, positions=position)
        if out:
            write_atomic(out, parts.to_dataframe().to_csv(index=False))
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

@app.command()
def highway(
    depths: str = typer.Option("2,4,8,16,32,64", "--depths", help="Toy stack depths (blocks), comma-separated."),
    steps: int = typer.Option(300, "--steps", help="Training steps per toy stack (0: measure at init only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the toy task, weights and batch order."),
    width: int = typer.Option(64, "--width", help="Width of the toy stacks."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (the same for plain and residual)."),
    norm: str = typer.Option("none", "--norm", help="Toy blocks: none, or layer (pre-LayerNorm)."),
    init: str = typer.Option("torch", "--init", help="Toy init: torch (PyTorch default) or he."),
    model: str = typer.Option(None, "--model", help="'smollm2' (default), a .gguf file or an HF folder."),
    remove_skips: list[str] = typer.Option(["10-12", "all"], "--remove-skips",
                                           help="Real model: blocks whose skip is removed, e.g. 10-12 or 5,15,25 "
                                                "or all; repeat for several conditions ('all skips' always runs)."),
    window: int = typer.Option(64, "--window", help="Real model: tokens per text window."),
    n_windows: int = typer.Option(4, "--n-windows", help="Real model: number of text windows in the batch."),
    skip_real: bool = typer.Option(False, "--skip-real", help="Only the toy stacks (no real model)."),
    out: str = typer.Option("streamlens-out/highway", "--out", help="Folder for highway.csv, .json and .html."),
) -> None:
    """Why residual connections let deep stacks train: gradient norms per layer, toy stacks and SmolLM2."""
    import json
    import time

    started = time.perf_counter()
    try:
        from streamlens import highway as hw
        from streamlens.files import prepare_out_dir, write_atomic
        from streamlens.results import command_line

        parsed = []
        for part in depths.split(","):
            try:
                parsed.append(int(part))
            except ValueError:
                fail(f"depth {part.strip()!r} in --depths {depths!r} is not a whole number: give e.g. 2,4,8,16")
        config = hw.ToyConfig(depths=tuple(parsed), steps=steps, seed=seed, width=width, lr=lr, norm=norm, init=init)
        loaded = tokens = text = None
        removed: list[tuple[int, ...]] = [()]
        if not skip_real:
            from streamlens.model import load_model

            loaded = load_model(model)
            removed += [hw.parse_layers(spec, loaded.n_layers) for spec in remove_skips]
            tokens, text = hw.highway_tokens(loaded, window, n_windows)
        folder = prepare_out_dir(out)
        for name in ("highway.csv", "highway.json", "highway.html"):
            if (folder / name).is_dir():
                fail(f"{folder / name} is a folder: cannot write the {name} file there")
    except (ValueError, OSError) as error:
        fail(str(error))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    command = command_line()
    real = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as progress:
        work = sum(config.depths) * (config.steps + 1) * len(hw.KINDS)
        toy_task = progress.add_task("toy stacks (layer-steps)", total=work)
        toy = hw.toy_highway(config, lambda kind, depth: progress.advance(toy_task, depth), command=command)
        if loaded is not None:
            real_task = progress.add_task(f"{loaded.info.name}: conditions", total=len(removed))
            real = hw.skip_gradients(loaded, tokens, removed, text=text, command=command,
                                     on_condition=lambda: progress.advance(real_task))
    seconds = time.perf_counter() - started
    settings = {**{k: getattr(config, k) for k in ("depths", "steps", "seed", "width", "lr", "norm", "init",
                                                       "batch", "n_train", "d_in")},
                "optimiser": "Adam", "toy_dtype": "float64", "skip_real": skip_real}
    if real is not None:
        settings |= {"model": real.provenance.model, "weights_hash": real.provenance.weights_hash,
                     "removed_skips": [list(layers) for layers in real.removed], "text": real.text}
    facts = {"command": command, "seconds": f"{seconds:.1f}",
             **{key: str(value) for key, value in settings.items() if key != "weights_hash"}}
    meta = {"command": command, "seed": seed, "settings": settings,
            "versions": (real or toy).provenance.versions, "seconds": {"total": seconds, "toy": toy.seconds},
            "summary": hw.summary(toy, real)}
    try:
        csv_text = hw.tidy(toy, real).to_csv(index=False)
        html_text = hw.highway_report(toy, real, facts).to_html()
        for name, content in (("highway.csv", csv_text), ("highway.json", json.dumps(meta, indent=2) + "\n"),
                              ("highway.html", html_text)):
            write_atomic(folder / name, content).chmod(0o644)  # temporary files are private; these are shared
    except (ValueError, OSError) as error:
        fail(str(error))
    at_init, trained = toy.first_to_last(0), toy.first_to_last(-1)
    for d, depth in enumerate(toy.depths):
        typer.echo(f"depth {depth:>4}: grad ratio first/last at init  plain {float(at_init[0, d]):.3g}  residual "
                   f"{float(at_init[1, d]):.3g}; after training  plain {float(trained[0, d]):.3g}  residual "
                   f"{float(trained[1, d]):.3g}; final loss  plain {float(toy.final_loss[0, d]):.4f}  "
                   f"residual {float(toy.final_loss[1, d]):.4f}")
    if real is not None:
        for c, condition in enumerate(real.conditions):
            typer.echo(f"{real.provenance.model} {condition}: loss {float(real.loss[c]):.3f}; grad norm layer 0 "
                       f"{float(real.grad_norm[c, 0]):.4g}, layer {real.grad_norm.shape[1] - 1} "
                       f"{float(real.grad_norm[c, -1]):.4g}")
    typer.echo(f"wrote {folder}/highway.csv, highway.json, highway.html in {seconds:.1f} s")
