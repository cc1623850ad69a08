"""`streamlens prune`: choose blocks to remove, judge every strategy on held-out text, export and prove."""

from __future__ import annotations

import typer

from streamlens.cli.common import MIN_BOOTSTRAP, app, check_at_least, fail, progress_bar
from streamlens.cli.options import (TEXTS_HELP, Count, DataOptions, ModelOptions, OutputOptions, data_group,
                                    model_group, output_group, uses)


@app.command()
@uses(model=model_group(), data=data_group(command="prune", default="builtin", window=Count(64, 2),
                                           note="The choice data (the strategies choose on it)."),
      output=output_group(default="streamlens-out/prune", help="Folder for prune.csv, prune.json, prune.html (and "
                          "the exported model)."))
def prune(
    model: ModelOptions = None,
    data: DataOptions = None,
    blocks: int = typer.Option(None, "--blocks", "-k", help="Blocks to remove (default: L // 8)."),
    budget: float = typer.Option(None, "--budget", help="Instead of -k: remove the most blocks (measured greedy) whose "
                                 "loss increase on the choice data stays within this many nats."),
    strategy: str = typer.Option("greedy", "--strategy", help="Whose removal is exported: greedy, block_influence, "
                                 "angular, last (attention and mlp are measured, never exported)."),
    compare_up_to: int = typer.Option(None, "--compare-up-to", help="Compare the strategies on held-out text for "
                                      "k = 1 .. this (default: -k; L // 2 is the papers' range, slower)."),
    eval_data: str = typer.Option("stdlib", "--eval-data", help="Held-out data (windows must differ from --data's): "
                                  + TEXTS_HELP + "."),
    choice_windows: int = typer.Option(8, "--choice-windows", help="Windows the strategies choose on."),
    eval_windows: int = typer.Option(16, "--eval-windows", help="Held-out windows (the texts of every CI)."),
    export: bool = typer.Option(True, "--export/--no-export", help="Write the pruned model (HF folder) and prove it."),
    export_dir: str = typer.Option(None, "--export-dir", help="Folder for the pruned model (default: OUT/model); "
                                   "must not exist or be empty."),
    gguf: bool = typer.Option(False, "--gguf", help="Also write a float32 GGUF file into the export folder."),
    proof_windows: int = typer.Option(4, "--proof-windows", help="Held-out windows the export's logits are checked on."),
    seed: int = typer.Option(0, "--seed", help="Seeds the bootstrap."),
    batch_size: int = typer.Option(16, "--batch-size", help="Most sequences in one forward (texts x variants)."),
    n_boot: int = typer.Option(1000, "--bootstrap", help=f"Bootstrap replicates for the 95% CIs (over texts; at "
                               f"least {MIN_BOOTSTRAP})."),
    output: OutputOptions = None,
) -> None:
    """Remove k blocks (or a loss budget): every strategy side by side, judged on held-out text; export and prove."""
    import time
    from pathlib import Path

    started = time.perf_counter()
    _check_options(blocks, budget, strategy, compare_up_to, choice_windows, eval_windows, proof_windows, batch_size,
                   n_boot, export, gguf)
    from streamlens import data as D

    folder = (export_dir or str(Path(output.out) / "model")) if export else None
    window = data.window
    try:
        if folder is not None:
            from streamlens.model.export import check_export_folder

            check_export_folder(folder)
        if D.is_prompt_source(eval_data):
            raise ValueError(f"--eval-data {eval_data!r} is a prompt set: prune judges text windows")
        D.load_texts(eval_data)
        from streamlens.model.export import check_exportable

        model.check_paths()
        threads = model.set_threads()
        loaded = model.load()
        config = _config(loaded, blocks, budget, strategy, compare_up_to, folder, gguf, proof_windows,
                         seed, batch_size, n_boot, threads)
        if folder is not None:
            check_exportable(loaded.info.source)
        if gguf:
            from streamlens.model.gguf import check_gguf_export

            check_gguf_export(loaded.info.source)
        choice = D.corpus_batch(loaded, data.source, window, choice_windows)
        evaluation = D.corpus_batch(loaded, eval_data, window, eval_windows)
        D.check_disjoint(choice, evaluation)
        for option, batch in (("--data", choice), ("--eval-data", evaluation)):
            if batch.n_texts < 2:
                raise ValueError(f"{option} gives {batch.n_texts} window of {window} tokens: need at least 2")
    except (ValueError, OSError) as error:
        fail(str(error))
    run = _run(loaded, choice, evaluation, config)
    settings = {"model": model.name, "blocks": blocks, "budget": budget, "strategy": strategy,
                "compare_up_to": compare_up_to, "data": data.source, "eval_data": eval_data, "window": window,
                "choice_windows": choice_windows, "eval_windows": eval_windows, "gguf": gguf,
                "proof_windows": proof_windows, "seed": seed, "batch_size": batch_size, "threads": threads}
    _write(run, output, started, settings)



def _check_options(blocks, budget, strategy, compare_up_to, choice_windows, eval_windows, proof_windows, batch_size,
                   n_boot, export, gguf) -> None:
    """The options that need no model, checked before any work (bad ones exit 2)."""
    check_at_least(("--blocks", blocks, 1), ("--compare-up-to", compare_up_to, 1),
                   ("--choice-windows", choice_windows, 2), ("--eval-windows", eval_windows, 2),
                   ("--proof-windows", proof_windows, 1), ("--batch-size", batch_size, 1),
                   ("--bootstrap", n_boot, MIN_BOOTSTRAP))
    if budget is not None and blocks is not None:
        fail("give --blocks or --budget, not both")
    if budget is not None and not budget >= 0:
        fail(f"--budget {budget} must be at least 0 nats")
    from streamlens.results.prune import KINDS, STRATEGIES

    if strategy not in KINDS:
        fail(f"unknown --strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if export and KINDS[strategy] != "block":
        fail(f"--strategy {strategy} removes {KINDS[strategy]} sublayers, which no HF config of the families streamlens "
             f"checks can express (a block without its {KINDS[strategy]}): it is measured only; pass --no-export")
    if gguf and not export:
        fail("--gguf writes into the export folder: drop --no-export")


def _config(loaded, blocks, budget, strategy, compare_up_to, folder, gguf, proof_windows, seed, batch_size, n_boot,
            threads):
    from streamlens.ablation import EvalOptions
    from streamlens.prune.pipeline import PruneConfig

    options = EvalOptions(seed=seed, batch_size=batch_size, n_boot=n_boot, threads=threads)
    return PruneConfig(blocks, budget, strategy, compare_up_to, folder, gguf, proof_windows, options).check(
        loaded.n_layers)


def _run(loaded, choice, evaluation, config):
    from streamlens.model.export import ExportRefused
    from streamlens.prune.pipeline import run
    from streamlens.results import command_line

    chunks = max(-(-choice.n_texts // config.options.batch_size), -(-evaluation.n_texts // config.options.batch_size))
    with progress_bar() as bar:
        current: dict = {}

        def stage(name, total):
            if "task" in current:
                bar.update(current["task"], completed=bar.tasks[-1].total)
            current["task"] = bar.add_task(f"{loaded.info.name}: {name}", total=total * chunks)

        try:
            return run(loaded, choice, evaluation, config, stage=stage, command=command_line(),
                       progress=lambda n: bar.advance(current["task"], n) if "task" in current else None)
        except (ValueError, ExportRefused, OSError) as error:
            fail(str(error))


def _write(run, output: OutputOptions, started: float, settings: dict) -> None:
    import time

    from rich.console import Console
    from rich.table import Table

    from streamlens.pages.prune import prune_files
    from streamlens.results.prune import LABELS

    from streamlens.results import command_line

    settings["command"] = command_line()
    folder = output.write(prune_files(run, settings, time.perf_counter() - started))
    comparison = run.comparison
    table = Table(title=f"held-out loss ({comparison.eval_data}; clean {float(comparison.clean_loss.mean()):.3f}), "
                        f"95% CI")
    table.add_column("strategy")
    for k in range(1, comparison.k_max + 1):
        table.add_column(f"k={k}")
    for name in comparison.strategies:
        table.add_row(LABELS[name], *(("{:.3f} [{:.3f}, {:.3f}]".format(*comparison.summary(name, k)))
                                      for k in range(1, comparison.k_max + 1)))
    console = Console()
    console.print(table)
    console.print(f"removed blocks {list(run.removed)} ({run.strategy}, k={run.k})")
    if run.export is not None:
        diffs = ", ".join(f"{name} {value:.1e}" for name, value, _, _ in run.export.rows())
        console.print(f"exported to {run.export.folder}: max relative logit difference vs the simulated removal: "
                      f"{diffs} ({'passed' if run.export.passed else 'FAILED'})")
    typer.echo(f"wrote prune.csv, prune.json, prune.html to {folder} in {time.perf_counter() - started:.1f} s")
