"""`streamlens layers`: which layers matter, and why (the layer-pruning papers' protocols, with CIs)."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.common import MODEL_HELP, app, fail, parse_ints, progress_bar


@app.command()
def layers(
    model: list[str] = typer.Option(None, "--model", help=MODEL_HELP + " Repeat to overlay several models."),
    data: str = typer.Option(None, "--data", help="builtin (default), a .txt or .jsonl file of texts, or a literal "
                             "text (text windows; prompt sets are not used here)."),
    window: int = typer.Option(32, "--window", help="Tokens per window of text."),
    max_windows: int = typer.Option(4, "--max-windows", help="Most windows (the texts of every CI). The default "
                                    "is a quick look; 16 is the full study (CIs about 2x narrower, 4x the time)."),
    span_sizes: str = typer.Option(None, "--span-sizes", help="Sizes whose every span is measured, e.g. 4,8,15 "
                                   "(default: ceil(L/8), ceil(L/4), L/2)."),
    greedy_pool: int = typer.Option(6, "--greedy-pool", help="Greedy removal per kind runs over this many "
                                    "least-damaging sublayers (U of them cost U(U+1)/2 evaluations; 8 in the full "
                                    "study)."),
    repair_layers: str = typer.Option(None, "--repair-layers", help="Layers whose heads get the self-repair split, "
                                      "e.g. 20-29 or all (default: the last third); sublayers: always all."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    seed: int = typer.Option(0, "--seed", help="Seeds the resample donors and the bootstrap."),
    batch_size: int = typer.Option(64, "--batch-size", help="Most sequences in one forward (texts x variants)."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates for the 95% CIs (over texts)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (1 is often faster on a busy machine)."),
    out: str = typer.Option("streamlens-out/layers", "--out", help="Folder for layers.csv, layers.json, layers.html."),
    workers: int = B.WORKERS,
) -> None:
    """Which layers can go, what predicts it cheaply, and do the papers' findings hold on this model."""
    import time

    started = time.perf_counter()
    for option, value in (("--window", window), ("--max-windows", max_windows), ("--greedy-pool", greedy_pool),
                          ("--batch-size", batch_size), ("--bootstrap", n_boot),
                          ("--threads", 1 if threads is None else threads)):
        if value < 1:
            fail(f"{option} {value} must be at least 1")
    if window < 2:
        fail(f"--window {window} must be at least 2 (a window predicts its next tokens)")
    if max_windows < 2:
        fail(f"--max-windows {max_windows} must be at least 2 (resample ablation and CIs need two texts)")
    on_ray = B.check_backend_options(workers, None, device)
    sizes = parse_ints("--span-sizes", span_sizes)
    heads_layers = None if repair_layers in (None, "all") else parse_ints("--repair-layers", repair_layers)
    from streamlens import data as D
    from streamlens.files import check_out_dir, write_outputs

    try:
        check_out_dir(out)
        D.check_source(data)
        if D.is_prompt_source(data):
            raise ValueError(f"--data {data!r} is a prompt set: the layer study runs on text windows (builtin, a "
                             f".txt or .jsonl file of texts, or a text)")
        from streamlens import layers as LY
        from streamlens.ablation import EvalOptions
        from streamlens.model import load_model
        from streamlens.results import command_line

        options = EvalOptions(seed=seed, batch_size=batch_size, n_boot=n_boot, threads=threads)
        loaded, batches, configs = [], [], []
        for name in model or [None]:
            one = load_model(name, dtype=dtype, device=device)
            every = None if repair_layers == "all" else heads_layers
            config = LY.StudyConfig(tuple(sizes) if sizes else None, greedy_pool,
                                    tuple(range(one.n_layers)) if repair_layers == "all" else every, options)
            configs.append(config.check(one))
            batches.append(D.load_batch(one, data, window=window, max_windows=max_windows))
            if batches[-1].n_texts < 2:
                raise ValueError(f"--data gives {batches[-1].n_texts} window of {window} tokens: the study needs at "
                                 f"least 2 (give more text or a smaller --window)")
            loaded.append(one)
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    studies = [_study(one, batch, config, command, (workers, device, threads) if on_ray else None)
               for one, batch, config in zip(loaded, batches, configs)]
    settings = {"command": command, "window": window, "max_windows": max_windows, "span_sizes": span_sizes,
                "greedy_pool": greedy_pool, "repair_layers": repair_layers or "last third", "seed": seed,
                "batch_size": batch_size, "threads": threads,
                "backend": studies[0].blocks.provenance.backend}
    from streamlens.pages.layers import layers_files

    seconds = time.perf_counter() - started
    try:
        folder = write_outputs(out, layers_files(studies, settings, seconds))
    except (ValueError, OSError) as error:
        fail(str(error))
    _print(studies)
    typer.echo(f"wrote layers.csv, layers.json, layers.html to {folder} in {time.perf_counter() - started:.1f} s")


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
    from streamlens import layers as LY

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
