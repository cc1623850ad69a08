"""`streamlens residuals`: the residual family (plain, pre/post-norm, highway, ReZero, dense) measured on
three testbeds, with the lesion test and a verdict table."""

from __future__ import annotations

import typer

from streamlens.cli.common import app, check_at_least, fail, parse_ints, progress_bar
from streamlens.cli.options import OutputOptions, output_group, uses

_VARIANTS = "plain, pre_norm, post_norm, highway, rezero, dense, concat"


def _names(option: str, text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not text.strip() or any(not name for name in names):
        fail(f"{option} {text!r} not understood: give comma-separated names, e.g. plain,pre_norm")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        fail(f"{option} {text!r} repeats {', '.join(repeated)}: give each name once")
    return names


def _numbers(option: str, text: str, what: str, low: int = 0, high: int | None = None) -> tuple[int, ...]:
    """Numbers and ranges as `parse_ints` reads them, but a repeat is refused, not silently dropped
    (`--seeds 1,1` would otherwise run one seed where the user asked for two runs)."""
    numbers = [n for part in text.split(",") for n in (parse_ints(option, part) if part.strip() else [None])]
    if None in numbers:
        fail(f"{option} {text!r} not understood: give comma-separated numbers and ranges, e.g. 0-2 or 2,8")
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        fail(f"{option} {text!r} repeats {', '.join(map(str, repeated))}: give each {what} once")
    for number in numbers:
        if number < low or (high is not None and number > high):
            fail(f"{what} {number} in {option} {text!r} out of range: must be {low}-{high}" if high is not None
                 else f"{what} {number} in {option} {text!r} out of range: must be >= {low}")
    return tuple(numbers)


@app.command()
@uses(output=output_group(default="streamlens-out/residuals", help="Folder for residuals.csv, .json and .html."))
def residuals(
    testbeds: str = typer.Option("mlp,lm,cnn", "--testbeds", help="Testbeds: mlp (toy MLP), lm (character "
                                 "Transformer on the built-in texts), cnn (ResNet basic block on 8x8 digits)."),
    variants: str = typer.Option(",".join(("plain", "pre_norm", "post_norm", "highway", "rezero", "dense", "concat")),
                                 "--variants", help=f"Variants on the toy MLP: {_VARIANTS}."),
    lm_variants: str = typer.Option("plain,pre_norm,post_norm,rezero", "--lm-variants",
                                    help=f"Variants on the Transformer: {_VARIANTS}."),
    seeds: str = typer.Option("0-2", "--seeds", help="Seeds (weights and batch order), e.g. 0-2 or 0,5,9."),
    mlp_depths: str = typer.Option("2,12", "--mlp-depths", help="Toy MLP depths (blocks)."),
    lm_depths: str = typer.Option("2,4", "--lm-depths", help="Transformer depths (blocks of attention + MLP)."),
    cnn_depths: str = typer.Option("2,6", "--cnn-depths", help="CNN depths (basic blocks)."),
    steps: int = typer.Option(80, "--steps", help="Adam updates per run."),
    eval_every: int = typer.Option(20, "--eval-every", help="Measure held-out loss and gradients every N steps."),
    warmup: int = typer.Option(16, "--warmup", help="Warm-up steps of the extra pre/post-norm Transformer runs "
                                                    "(Xiong et al. 2020); 0: no such runs."),
    workers: int = typer.Option(2, "--workers", help="Processes that train runs side by side (one thread "
                                "each; the numbers do not depend on it)."),
    output: OutputOptions = None,
) -> None:
    """The residual family measured: gradients, losses, lesions, memory and a verdict table."""
    import time

    started = time.perf_counter()
    check_at_least(("--workers", workers, 1))
    try:
        from streamlens.results.residuals import MAX_DEPTH, ResidualConfig

        config = ResidualConfig(
            testbeds=_names("--testbeds", testbeds), mlp_variants=_names("--variants", variants),
            lm_variants=_names("--lm-variants", lm_variants), seeds=_numbers("--seeds", seeds, "seed"),
            mlp_depths=_numbers("--mlp-depths", mlp_depths, "depth", 1, MAX_DEPTH),
            lm_depths=_numbers("--lm-depths", lm_depths, "depth", 1, MAX_DEPTH),
            cnn_depths=_numbers("--cnn-depths", cnn_depths, "depth", 1, MAX_DEPTH), steps=steps,
            eval_every=eval_every, warmup=warmup)
        if "cnn" in config.testbeds:
            _need_sklearn()
    except ValueError as error:
        fail(str(error))

    from streamlens.highway.study import plan, residual_study, work
    from streamlens.pages.residuals import residuals_files
    from streamlens.results import command_line

    command = command_line()
    with progress_bar(transient=False) as progress:
        task = progress.add_task("runs (block-steps)", total=sum(work(run, config) for run in plan(config)))
        study = residual_study(config, lambda run: progress.advance(task, work(run, config)), command=command,
                               workers=workers)
    if not bool(study.train_loss.isfinite().all()):  # a diverged run is no measurement: say so, write nothing
        fail("a run diverged (training loss not finite): try fewer steps or other variants")
    seconds = time.perf_counter() - started
    folder = output.write(residuals_files(study, command, seconds))
    _echo_verdicts(study)
    typer.echo(f"wrote {folder}/residuals.csv, residuals.json, residuals.html in {seconds:.1f} s")


def _need_sklearn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        fail("the cnn testbed needs scikit-learn: pip install 'streamlens[residuals]', or leave cnn out of --testbeds")


def _echo_verdicts(study) -> None:
    from streamlens.highway.verdicts import residual_verdicts

    for row in residual_verdicts(study):
        typer.echo(f"{row.verdict:>8}  {row.claim}: {row.number}")
