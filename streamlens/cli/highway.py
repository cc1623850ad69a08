"""`streamlens highway`: the gradient highway, on toy stacks and a real model."""

from __future__ import annotations

import typer

from streamlens.cli.common import app, check_at_least, fail, parse_ints, progress_bar
from streamlens.cli.options import ModelOptions, OutputOptions, model_group, output_group, uses


@app.command()
@uses(model=model_group(), output=output_group(default="streamlens-out/highway",
                                               help="Folder for highway.csv, .json and .html."))
def highway(
    depths: str = typer.Option("2,4,8,16,32,64", "--depths", help="Toy stack depths (blocks), comma-separated."),
    steps: int = typer.Option(300, "--steps", help="Training steps per toy stack (0: measure at init only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the toy task, weights and batch order."),
    width: int = typer.Option(64, "--width", help="Width of the toy stacks."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (the same for plain and residual)."),
    norm: str = typer.Option("none", "--norm", help="Toy blocks: none, or layer (pre-LayerNorm)."),
    init: str = typer.Option("torch", "--init", help="Toy init: torch (PyTorch default) or he."),
    model: ModelOptions = None,
    remove_skips: list[str] = typer.Option(["10-12", "all"], "--remove-skips",
                                           help="Real model: blocks whose skip is removed, e.g. 10-12 or 5,15,25 "
                                                "or all; repeat for several conditions ('all skips' always runs)."),
    window: int = typer.Option(64, "--window", help="Real model: tokens per text window."),
    n_windows: int = typer.Option(4, "--n-windows", help="Real model: number of text windows in the batch."),
    skip_real: bool = typer.Option(False, "--skip-real", help="Only the toy stacks (no real model; they always run on "
                                   "1 thread)."),
    output: OutputOptions = None,
) -> None:
    """Why residual connections let deep stacks train: gradient norms per layer, toy stacks and SmolLM2."""
    import time

    started = time.perf_counter()
    check_at_least(("--window", window, 2), ("--n-windows", n_windows, 1))
    try:
        from streamlens import highway as hw
        from streamlens.pages import highway as pages
        from streamlens.results import command_line
        from streamlens.sites import parse_layers

        parsed = parse_ints("--depths", depths)
        config = hw.ToyConfig(depths=tuple(parsed), steps=steps, seed=seed, width=width, lr=lr, norm=norm, init=init)
        model.set_threads()
        loaded = tokens = text = None
        removed: list[tuple[int, ...]] = [()]
        if not skip_real:
            loaded = model.load()
            removed += [parse_layers(spec, loaded.n_layers) for spec in remove_skips]
            tokens, text = hw.highway_tokens(loaded, window, n_windows)
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    toy, real = _measure(config, loaded, tokens, removed, text, command)
    seconds = time.perf_counter() - started
    if not bool(toy.final_loss.isfinite().all()):  # a diverged run is no measurement: say so, write nothing
        fail(f"training diverged (final loss not finite) with --lr {lr}: try a smaller learning rate, e.g. 1e-3")
    folder = output.write(pages.highway_files(toy, real, config, command, seconds))
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


def _measure(config, model, tokens, removed, text, command):
    """Train the toy stacks and, with a model, measure its gradients; one progress bar each: (toy, real)."""
    from streamlens import highway as hw

    real = None
    with progress_bar(transient=False) as progress:
        work = sum(config.depths) * (config.steps + 1) * len(hw.KINDS)
        toy_task = progress.add_task("toy stacks (layer-steps)", total=work)
        toy = hw.toy_highway(config, lambda kind, depth: progress.advance(toy_task, depth), command=command)
        if model is not None:
            real_task = progress.add_task(f"{model.info.name}: conditions", total=len(removed))
            real = hw.skip_gradients(model, tokens, removed, text=text, command=command,
                                     on_condition=lambda: progress.advance(real_task))
    return toy, real
