"""`streamlens layers`: which layers matter, and why (the layer-pruning papers' protocols, with CIs)."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.common import BOOTSTRAP, app, check_at_least, check_bootstrap, fail, parse_ints, progress_bar
from streamlens.cli.options import (Count, DataOptions, ModelOptions, OutputOptions, data_group, model_group,
                                    output_group, uses)


@app.command()
@uses(model=model_group(many=True),
      data=data_group(command="layers", window=Count(32, 2, "a window predicts its next tokens"),
                      max_windows=Count(4, 2, "resample ablation and CIs need two texts", help="Most windows (the "
                                        "texts of every CI). The default is a quick look; 16 is the full study (CIs "
                                        "about 2x narrower, 4x the time)."),
                      note="Text windows; prompt sets are not used here."),
      output=output_group(default="streamlens-out/layers", help="Folder for layers.csv, layers.json, layers.html."))
def layers(
    model: ModelOptions,
    data: DataOptions = None,
    span_sizes: str = typer.Option(None, "--span-sizes", help="Sizes whose every span is measured, e.g. 4,8,15 "
                                   "(default: ceil(L/8), ceil(L/4), L/2)."),
    greedy_pool: int = typer.Option(6, "--greedy-pool", help="Greedy removal per kind runs over this many "
                                    "least-damaging sublayers (U of them cost U(U+1)/2 evaluations; 8 in the full "
                                    "study)."),
    repair_layers: str = typer.Option(None, "--repair-layers", help="Layers whose heads get the self-repair split, "
                                      "e.g. 20-29 or all (default: the last third); sublayers: always all."),
    seed: int = typer.Option(0, "--seed", help="Seeds the resample donors and the bootstrap."),
    batch_size: int = typer.Option(64, "--batch-size", help="Most sequences in one forward (texts x variants)."),
    n_boot: int = BOOTSTRAP,
    output: OutputOptions = None,
    workers: int = B.WORKERS,
) -> None:
    """Which layers can go, what predicts it cheaply, and do the papers' findings hold on this model."""
    import time

    started = time.perf_counter()
    check_at_least(("--greedy-pool", greedy_pool, 1), ("--batch-size", batch_size, 1))
    check_bootstrap(n_boot)  # the one rule of every command (streamlens.limits)
    on_ray = B.check_backend_options(workers, None, model.device)
    sizes = parse_ints("--span-sizes", span_sizes)
    heads_layers = None if repair_layers in (None, "all") else parse_ints("--repair-layers", repair_layers)
    try:
        from streamlens.ablation import EvalOptions

        from streamlens.results import command_line

        model.check_paths()
        options = EvalOptions(seed=seed, batch_size=batch_size, n_boot=n_boot, threads=model.set_threads())
        loaded = [model.load(name) for name in model.names or (None,)]  # every --model loads before any work
        configs = [_config(one, sizes, greedy_pool, repair_layers, heads_layers, options) for one in loaded]
        batches = [_batch(one, data) for one in loaded]
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    studies = [_study(one, batch, config, command, (workers, model.device, model.threads) if on_ray else None)
               for one, batch, config in zip(loaded, batches, configs)]
    settings = {"command": command, "window": data.window, "max_windows": data.max_windows, "span_sizes": span_sizes,
                "greedy_pool": greedy_pool, "repair_layers": repair_layers or "last third", "seed": seed,
                "batch_size": batch_size, "threads": model.threads, "backend": studies[0].blocks.provenance.backend}
    from streamlens.pages.layers import layers_files

    seconds = time.perf_counter() - started
    folder = output.write(layers_files(studies, settings, seconds))
    _print(studies)
    typer.echo(f"wrote layers.csv, layers.json, layers.html to {folder} in {time.perf_counter() - started:.1f} s")


def _config(model, sizes, greedy_pool, repair_layers, heads_layers, options):
    """The study's settings for one model, checked against it (span sizes, repair layers)."""
    from streamlens import importance as LY

    every = tuple(range(model.n_layers)) if repair_layers == "all" else heads_layers
    return LY.StudyConfig(tuple(sizes) if sizes else None, greedy_pool, every, options).check(model)


def _batch(model, data):
    """The text windows of one model's study (at least two: the CIs resample texts)."""
    from streamlens.data import load_batch

    batch = load_batch(model, data.source, window=data.window, max_windows=data.max_windows)
    if batch.n_texts < 2:
        raise ValueError(f"--data gives {batch.n_texts} window of {data.window} tokens: the study needs at least 2 "
                         f"(give more text or a smaller --window)")
    return batch


def _study(model, batch, config, command, ray=None):
    """One model's study under one progress bar (a task per stage); ray: (workers, device, threads) for
    Ray workers that load this model (a fresh set per model)."""
    backend = None if ray is None else B.connect(ray[0], None, ray[1], ray[2])
    try:
        return _run(model, batch, config, command, backend)
    finally:
        if backend is not None:
            backend.close()


def _run(model, batch, config, command, backend):
    from streamlens import importance as LY

    chunks = -(-batch.n_texts // min(config.options.batch_size, batch.n_texts))
    with progress_bar() as bar:
        current = {}

        def stage(name, total):
            if "task" in current:
                bar.update(current["task"], completed=bar.tasks[-1].total)
            current["task"] = bar.add_task(f"{model.info.name}: {name}", total=total * chunks)

        return LY.layer_study(model, batch, config, stage=stage,
                              progress=lambda n: bar.advance(current["task"], n) if "task" in current else None,
                              command=command, backend=backend)


def _print(studies) -> None:
    from rich.console import Console
    from rich.table import Table

    from streamlens.pages.layers import summary

    console = Console()
    for study in studies:
        table = Table(title=f"{study.model}: the papers' claims ({study.blocks.n_texts} texts, 95% CI)")
        for column in ("claim", "number [95% CI]", "verdict"):
            table.add_column(column)
        for v in study.verdicts:
            table.add_row(v.claim, v.number, v.verdict)
        console.print(table)
        numbers = summary(study)
        for size, pair in numbers["best_spans"].items():
            predicted, measured = pair["predicted"], pair["measured"]
            console.print(f"span of {size}: predicted {predicted['blocks'] if predicted else '-'} "
                          f"(+{predicted['loss_increase']:.3f})  cheapest {measured['blocks']} "
                          f"(+{measured['loss_increase']:.3f} [{measured['ci_low']:.3f}, {measured['ci_high']:.3f}])"
                          if predicted else f"span of {size}: cheapest {measured['blocks']}")
        console.print(f"removable before +0.5 nats (greedy): {numbers['removable_before']['+0.5']}; median repaired "
                      f"fraction of heads: {numbers['median_repaired_fraction_heads']}")
