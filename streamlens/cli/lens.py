"""`streamlens lens train` / `streamlens lens eval`: the tuned lens, trained and read next to the logit lens."""

from __future__ import annotations

import typer

from streamlens.cli.common import app, fail, progress_bar
from streamlens.cli.options import (Count, DataOptions, ModelOptions, OutputOptions, data_group, model_group,
                                    output_group, uses)

lens_app = typer.Typer(help="The tuned lens: train affine translators per layer; compare with the logit lens.",
                       no_args_is_help=True)
app.add_typer(lens_app, name="lens")

HOLD_OUT_HELP = "Every n-th built-in text is held out for evaluation (the rest train)."


def _report(comparison) -> None:
    kl = comparison.mean_kl()
    for stage, label in enumerate(comparison.layer_labels):
        typer.echo(f"after {label:>5}: mean KL logit lens {float(kl[0, stage]):8.3f}  tuned lens {float(kl[1, stage]):8.3f}")


@lens_app.command("train")
@uses(model=model_group(), data=data_group(command="lens train", window=Count(64, 2), note="Training texts (builtin: "
                                           "split into train and held out)."),
      output=output_group(default="streamlens-out/lens", help="Folder for lens.safetensors, "
                          "lens_train.csv/.json/.html."))
def train(
    model: ModelOptions,
    data: DataOptions = None,
    steps: int = typer.Option(80, "--steps", help="Adam updates."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate."),
    batch_tokens: int = typer.Option(24, "--batch-tokens", help="Tokens per update (each trains every layer)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the mini-batch order."),
    hold_out_every: int = typer.Option(5, "--hold-out-every", help=HOLD_OUT_HELP),
    output: OutputOptions = None,
) -> None:
    """Train a tuned lens (identity-initialised affine translator per layer) and compare it with the logit lens."""
    import time

    started = time.perf_counter()
    for option, value, low in (("--steps", steps, 1), ("--batch-tokens", batch_tokens, 1), ("--seed", seed, 0),
                               ("--hold-out-every", hold_out_every, 2)):
        if value < low:
            fail(f"{option} {value} out of range: must be at least {low}")
    try:
        from streamlens.pages.identity import lens_files
        from streamlens.results import command_line
        from streamlens.tunedlens import check_lr, compare_lenses, record_texts, train_tuned_lens, training_split

        check_lr(lr)
        model.set_threads()
        loaded = model.load()
        trained_on, held = training_split(loaded, data.source, data.window, hold_out_every)
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    try:
        with progress_bar(transient=False) as progress:
            task = progress.add_task(f"{loaded.info.name}: tuned lens steps", total=steps)
            lens = train_tuned_lens(loaded, trained_on.windows.tokens, steps=steps, lr=lr, batch_tokens=batch_tokens,
                                    seed=seed, text=trained_on.windows.description + " (training texts)",
                                    command=command, on_step=lambda step, loss: progress.update(
                                        task, advance=1, description=f"tuned lens: loss {loss:.2f}"))
    except ValueError as error:  # LensDivergedError: a diverged lens is no lens; nothing is written
        fail(str(error))
    lens = record_texts(lens, data.source, data.window, hold_out_every, trained_on, held)
    evaluated = held if held is not None else trained_on
    comparison = compare_lenses(loaded, evaluated.windows.tokens, lens, evaluated.windows.text_of,
                                text=evaluated.windows.description + (" (held-out texts)" if held is not None else
                                                                      " (training texts: --data has fewer than --hold-out-every texts, none held out)"),
                                command=command, text_hashes=evaluated.hashes)
    seconds = time.perf_counter() - started
    folder = output.write(lens_files(comparison, lens, command, seconds, "lens_train"))
    _report(comparison)
    typer.echo(f"trained in {lens.seconds:.1f} s on {lens.threads} threads; wrote {folder}/lens.safetensors, "
               f"lens_train.csv, lens_train.json, lens_train.html in {seconds:.1f} s")


@lens_app.command("eval")
@uses(model=model_group(), data=data_group(command="lens eval", window=Count(64, 2), note="Default: the lens's own "
                                           "held-out texts; training texts are refused."),
      output=output_group(default="streamlens-out/lens", help="Folder for lens_eval.csv, .json and .html."))
def evaluate(
    lens_path: str = typer.Option(..., "--lens", help="A lens.safetensors written by `streamlens lens train`."),
    model: ModelOptions = None,
    data: DataOptions = None,
    hold_out_every: int = typer.Option(5, "--hold-out-every", help=HOLD_OUT_HELP),
    output: OutputOptions = None,
) -> None:
    """KL to the model's output and rank of its top token per layer: logit lens vs a trained tuned lens."""
    import time
    from pathlib import Path

    started = time.perf_counter()
    if hold_out_every < 2:
        fail(f"--hold-out-every {hold_out_every} out of range: must be at least 2")
    try:
        from streamlens.pages.identity import lens_files
        from streamlens.results import command_line
        from streamlens.tunedlens import TunedLens, check_lens, compare_lenses, evaluation_texts

        if not Path(lens_path).is_file():
            raise ValueError(f"--lens {lens_path} is not a file: give a lens.safetensors from `streamlens lens train`")
        try:
            lens = TunedLens.load(lens_path)
        except Exception as error:  # damaged (says so, naming the file), or safetensors' own errors for a non-lens
            said = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--lens {said}" if str(lens_path) in said else
                             f"--lens {lens_path} is not a tuned lens ({said})") from None
        model.set_threads()
        loaded = model.load()
        check_lens(loaded, lens)
        chosen = evaluation_texts(loaded, lens, data.source, data.window, hold_out_every)
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    which = "the lens's own held-out texts" if data.source is None else "texts the lens was not trained on"
    with progress_bar() as progress:
        progress.add_task(f"{loaded.info.name}: reading both lenses", total=None)
        comparison = compare_lenses(loaded, chosen.windows.tokens, lens, chosen.windows.text_of,
                                    text=f"{chosen.windows.description} ({which})", command=command,
                                    text_hashes=chosen.hashes)
    seconds = time.perf_counter() - started
    folder = output.write(lens_files(comparison, None, command, seconds, "lens_eval"))
    _report(comparison)
    typer.echo(f"wrote {folder}/lens_eval.csv, lens_eval.json, lens_eval.html in {seconds:.1f} s")
