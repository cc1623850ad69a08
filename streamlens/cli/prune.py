"""`streamlens prune`: choose blocks to remove, judge every strategy on held-out text, export and prove, judge
the exported model against the full one, and (with --heal-steps) heal it.

Its own option groups, declared once here (only typer is imported at module level): `Pruning` (what is
removed, judged and exported), `Healing` (--heal-*). Each is checked before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from streamlens.cli.common import BOOTSTRAP, app, check_at_least, check_bootstrap, check_choice, fail, progress_bar
from streamlens.cli.options import (TEXTS_HELP, Count, DataOptions, Group, ModelOptions, OutputOptions, data_group,
                                    model_group, output_group, uses)

if TYPE_CHECKING:  # (heavy: imported where used)
    import torch

    from streamlens.data import TokenBatch
    from streamlens.model import Model
    from streamlens.prune.pipeline import PruneConfig

STRATEGY_NAMES = ("greedy", "block_influence", "angular", "last", "attention", "mlp")  # results.prune.STRATEGIES
HEAL_MODES, HEAL_LOSSES = ("lora", "full"), ("lm", "distill")  # model.train.MODES, LOSSES (torch-free here)


@dataclass(frozen=True)
class Pruning:
    """What to remove, how to judge it, whether to export and evaluate (checked; see `pruning_group`)."""

    blocks: int | None
    budget: float | None
    strategy: str
    compare_up_to: int | None
    eval_data: str
    choice_windows: int
    eval_windows: int
    export: bool
    export_dir: str | None
    gguf: bool
    proof_windows: int
    evaluate: bool
    generate_tokens: int
    seed: int
    batch_size: int
    n_boot: int


def pruning_group() -> Group:
    """The removal, judgement and export options of `prune`."""

    def build(**values) -> Pruning:
        pruning = Pruning(**values)
        check_pruning(pruning)
        return pruning

    option = typer.Option
    return Group({
        "blocks": (int, option(None, "--blocks", "-k", help="Blocks to remove (default: L // 8).")),
        "budget": (float, option(None, "--budget", help="Instead of -k: remove the most blocks (measured greedy) "
                                 "whose loss increase on the choice data stays within this many nats.")),
        "strategy": (str, option("greedy", "--strategy", help="Whose removal is exported: greedy, block_influence, "
                                 "angular, last (attention and mlp are measured, never exported).")),
        "compare_up_to": (int, option(None, "--compare-up-to", help="Compare the strategies on held-out text for "
                                      "k = 1 .. this (default: -k; L // 2 is the papers' range, slower).")),
        "eval_data": (str, option("stdlib", "--eval-data", help="Held-out data (windows must differ from --data's): "
                                  + TEXTS_HELP + ".")),
        "choice_windows": (int, option(8, "--choice-windows", help="Windows the strategies choose on.")),
        "eval_windows": (int, option(16, "--eval-windows", help="Held-out windows (the texts of every CI).")),
        "export": (bool, option(True, "--export/--no-export", help="Write the pruned model (HF folder), prove it, "
                                "and judge it against the full model.")),
        "export_dir": (str, option(None, "--export-dir", help="Folder for the pruned model (default: OUT/model); "
                                   "must not exist or be empty.")),
        "gguf": (bool, option(False, "--gguf", help="Also write a float32 GGUF file into the export folder (and the healed folder).")),
        "proof_windows": (int, option(4, "--proof-windows", help="Held-out windows the export's logits are "
                                      "checked on.")),
        "evaluate": (bool, option(True, "--evaluate/--no-evaluate", help="Judge the exported model against the "
                                  "full one on the held-out windows: loss, KL, top-1, prompts, size, tokens/s, "
                                  "greedy generations.")),
        "generate_tokens": (int, option(16, "--generate-tokens", help="Length of the greedy generations shown "
                                        "side by side.")),
        "seed": (int, option(0, "--seed", help="Seeds the bootstrap and the healing.")),
        "batch_size": (int, option(16, "--batch-size", help="Most sequences in one forward (texts x variants).")),
        "n_boot": (int, BOOTSTRAP),
    }, build)


def check_pruning(p: Pruning) -> None:
    """The options that need no model, checked before any work (bad ones exit 2)."""
    check_at_least(("--blocks", p.blocks, 1), ("--compare-up-to", p.compare_up_to, 1),
                   ("--choice-windows", p.choice_windows, 2), ("--eval-windows", p.eval_windows, 2),
                   ("--proof-windows", p.proof_windows, 1), ("--generate-tokens", p.generate_tokens, 1),
                   ("--batch-size", p.batch_size, 1))
    check_bootstrap(p.n_boot)  # the one rule of every command (streamlens.limits)
    if p.budget is not None and p.blocks is not None:
        fail("give --blocks or --budget, not both")
    if p.budget is not None and not p.budget >= 0:
        fail(f"--budget {p.budget} must be at least 0 nats")
    check_choice("--strategy", p.strategy, STRATEGY_NAMES)
    if p.export and p.strategy in ("attention", "mlp"):
        fail(f"--strategy {p.strategy} removes {p.strategy} sublayers, which no HF config of the families streamlens "
             f"checks can express (a block without its {p.strategy}): it is measured only; pass --no-export")
    if p.gguf and not p.export:
        fail("--gguf writes into the export folder: drop --no-export")


@dataclass(frozen=True)
class Healing:
    """--heal-* (steps 0: no healing), checked; `data` None: the choice data (--data)."""

    steps: int
    mode: str
    loss: str
    lr: float | None
    batch_size: int
    windows: int
    data: str | None
    folder: str | None


def healing_group() -> Group:
    """The options of a heal (`model.train.TrainSettings` plus its data and folder)."""

    def build(steps: int, mode: str, loss: str, lr: float | None, batch_size: int, windows: int, data: str | None,
              folder: str | None) -> Healing:
        if steps < 0:
            fail(f"--heal-steps {steps} must be 0 (no healing) or more")
        check_choice("--heal-mode", mode, HEAL_MODES)
        check_choice("--heal-loss", loss, HEAL_LOSSES)
        if lr is not None and not lr > 0:
            fail(f"--heal-lr {lr} must be positive")
        check_at_least(("--heal-batch-size", batch_size, 1), ("--heal-windows", windows, 1))
        return Healing(steps, mode, loss, lr, batch_size, windows, data, folder)

    option = typer.Option
    return Group({
        "steps": (int, option(0, "--heal-steps", help="Heal the exported model with this many training steps "
                              "(0: no healing).")),
        "mode": (str, option("lora", "--heal-mode", help="lora (rank 8, merged into the weights) or full.")),
        "loss": (str, option("distill", "--heal-loss", help="distill (KL to the full model's logits) or lm "
                             "(next-token loss).")),
        "lr": (float, option(None, "--heal-lr", help="Learning rate (default: 1e-3 for lora, 5e-5 for full).")),
        "batch_size": (int, option(2, "--heal-batch-size", help="Windows per training step.")),
        "windows": (int, option(64, "--heal-windows", help="Training windows (of --window tokens).")),
        "data": (str, option(None, "--heal-data", help="Training texts, disjoint from --eval-data's (default: "
                             "--data): " + TEXTS_HELP + ".")),
        "folder": (str, option(None, "--heal-dir", help="Folder for the healed model (default: the export folder "
                               "+ '-healed'); must not exist or be empty.")),
    }, build)


@app.command()
@uses(model=model_group(), data=data_group(command="prune", default="builtin", window=Count(64, 2),
                                           note="The choice data (the strategies choose on it)."),
      pruning=pruning_group(), healing=healing_group(),
      output=output_group(default="streamlens-out/prune", help="Folder for prune.csv, prune.json, prune.html (and "
                          "the exported model)."))
def prune(model: ModelOptions = None, data: DataOptions = None, pruning: Pruning = None, healing: Healing = None,
          output: OutputOptions = None) -> None:
    """Remove k blocks (or a loss budget): every strategy side by side, judged on held-out text; export, prove,
    judge the exported model against the full one, and optionally heal it."""
    import time

    started = time.perf_counter()
    inputs = load_inputs(model, data, pruning, healing, output)
    write_run(run_pipeline(inputs), inputs, output, started)


@dataclass(frozen=True)
class Inputs:
    """What the pipeline runs on, loaded and checked: the model, the three sets of windows, the config."""

    model: "Model"
    choice: "TokenBatch"
    evaluation: "TokenBatch"
    heal_tokens: "torch.Tensor | None"  # [n, window] training windows (None: no healing)
    heal_data: str
    config: "PruneConfig"
    settings: dict[str, Any]


def load_inputs(model: ModelOptions, data: DataOptions, pruning: Pruning, healing: Healing,
                output: OutputOptions) -> Inputs:
    """Check the folders and sources, load the model and cut the windows; any bad input exits 2 (nothing written)."""
    from pathlib import Path

    from streamlens import data as D

    folder = (pruning.export_dir or str(Path(output.out) / "model")) if pruning.export else None
    heal_source = healing.data if healing.data is not None else data.source
    try:
        if healing.steps and folder is None:
            raise ValueError("--heal-steps trains the exported model: drop --no-export")
        for option, source in (("--eval-data", pruning.eval_data), ("--heal-data", heal_source)):
            if D.is_prompt_source(source):
                raise ValueError(f"{option} {source!r} is a prompt set: prune judges and heals on text windows")
            D.check_source(source)
        model.check_paths()
        threads = model.set_threads()
        loaded = model.load()
        config = pipeline_config(loaded, pruning, healing, folder, threads)
        check_family(loaded.info.source, folder, pruning.gguf)
        choice, evaluation = (D.corpus_batch(loaded, source, data.window, count) for source, count in
                              ((data.source, pruning.choice_windows), (pruning.eval_data, pruning.eval_windows)))
        D.check_disjoint(choice, evaluation)
        for option, batch in (("--data", choice), ("--eval-data", evaluation)):
            if batch.n_texts < 2:
                raise ValueError(f"{option} gives {batch.n_texts} window of {data.window} tokens: need at least 2")
        heal_tokens = heal_windows(loaded, heal_source, data.window, healing, evaluation) if healing.steps else None
    except (ValueError, OSError) as error:
        fail(str(error))
    settings = {"model": model.name, "data": data.source, "window": data.window, "threads": threads,
                **vars(pruning),
                "heal": {**vars(healing), "data": heal_source}}
    return Inputs(loaded, choice, evaluation, heal_tokens, str(heal_source or "builtin"), config, settings)


def check_family(source: str, folder: str | None, gguf: bool) -> None:
    """Refuse (before any work) a family whose config cannot lose blocks, or whose tokenizer has no GGUF form."""
    if folder is not None:
        from streamlens.model.export import check_exportable

        check_exportable(source)
    if gguf:
        from streamlens.model.gguf import check_gguf_export

        check_gguf_export(source)


def heal_windows(loaded, source: str | None, window: int, healing: Healing, evaluation):
    """Training windows [n, window] of the heal data, refused when one repeats a held-out window."""
    from streamlens import data as D
    from streamlens.prune.heal import check_disjoint

    tokens = D.corpus_batch(loaded, source, window, healing.windows).tokens
    check_disjoint(tokens, evaluation.tokens)
    return tokens


def pipeline_config(loaded, pruning: Pruning, healing: Healing, folder: str | None, threads: int):
    """The `PruneConfig` of the options (checked against the model: k in range, folders free)."""
    from streamlens.ablation import EvalOptions
    from streamlens.model.train import TrainSettings
    from streamlens.prune.evaluate import EvaluateSettings
    from streamlens.prune.pipeline import PruneConfig

    options = EvalOptions(seed=pruning.seed, batch_size=pruning.batch_size, n_boot=pruning.n_boot, threads=threads)
    evaluate = (EvaluateSettings(new_tokens=pruning.generate_tokens, threads=threads, n_boot=pruning.n_boot,
                                 seed=pruning.seed) if pruning.evaluate and folder is not None else None)
    heal = (TrainSettings(healing.steps, healing.mode, healing.loss, healing.lr, healing.batch_size, pruning.seed,
                          threads=threads) if healing.steps else None)
    return PruneConfig(pruning.blocks, pruning.budget, pruning.strategy, pruning.compare_up_to, folder, pruning.gguf,
                       pruning.proof_windows, options, evaluate, heal, healing.folder).check(loaded.n_layers)


def run_pipeline(inputs: Inputs):
    """`prune.pipeline.run` under a progress bar (one bar per step); a refusal found on the way exits 2."""
    from streamlens.model.export import ExportRefused
    from streamlens.prune.pipeline import run
    from streamlens.results import command_line

    loaded, choice, evaluation, config = inputs.model, inputs.choice, inputs.evaluation, inputs.config
    chunks = max(-(-choice.n_texts // config.options.batch_size), -(-evaluation.n_texts // config.options.batch_size))
    with progress_bar() as bar:
        current: dict = {}

        def stage(name, total):
            if "task" in current:
                bar.update(current["task"], completed=bar.tasks[-1].total)
            current["task"] = bar.add_task(f"{loaded.info.name}: {name}", total=total * chunks)

        try:
            return run(loaded, choice, evaluation, config, heal_tokens=inputs.heal_tokens, heal_data=inputs.heal_data,
                       stage=stage, command=command_line(),
                       progress=lambda n: bar.advance(current["task"], n) if "task" in current else None)
        except (ValueError, ExportRefused, OSError) as error:
            fail(str(error))


def write_run(run, inputs: Inputs, output: OutputOptions, started: float) -> None:
    """Write the files as one set, then print the held-out table and what was exported, judged and healed."""
    import time

    from rich.console import Console

    from streamlens.pages.prune import prune_files
    from streamlens.results import command_line

    settings = {**inputs.settings, "command": command_line()}
    try:
        files = prune_files(run, settings, time.perf_counter() - started)
        folder = output.write(files)
    except BaseException:  # interrupted or refused before the files were in place: no model folder of this run stays
        from streamlens.prune.pipeline import remove_folders

        remove_folders(run.export.folder if run.export else None, run.heal.folder if run.heal else None)
        raise
    console = Console()
    console.print(strategy_table(run.comparison))
    for line in summary_lines(run):
        console.print(line, highlight=False)
    typer.echo(f"wrote {', '.join(files)} to {folder} in {time.perf_counter() - started:.1f} s")


def strategy_table(comparison):
    """Held-out loss [95% CI] of every strategy (rows) and k (columns), as a rich table."""
    from rich.table import Table

    from streamlens.results.prune import LABELS

    table = Table(title=f"held-out loss ({comparison.eval_data}; clean {float(comparison.clean_loss.mean()):.3f}), "
                        f"95% CI")
    table.add_column("strategy")
    for k in range(1, comparison.k_max + 1):
        table.add_column(f"k={k}")
    for name in comparison.strategies:
        table.add_row(LABELS[name], *(("{:.3f} [{:.3f}, {:.3f}]".format(*comparison.summary(name, k)))
                                      for k in range(1, comparison.k_max + 1)))
    return table


def summary_lines(run) -> list[str]:
    """What was removed and exported, the proof, the pruned-vs-full judgement and the heal, one line each."""
    lines = [f"removed blocks {list(run.removed)} ({run.strategy}, k={run.k})"]
    if run.export is not None:
        diffs = ", ".join(f"{name} {value:.1e}" for name, value, _, _ in run.export.rows())
        lines.append(f"exported to {run.export.folder}: max relative logit difference vs the simulated removal: "
                     f"{diffs} ({'passed' if run.export.passed else 'FAILED'})")
    if run.evaluation is not None:
        table = run.evaluation.to_dataframe().set_index(["metric", "model"])
        loss = table.loc[("loss", "pruned - full")]
        kl = table.loc[("kl_full_pruned", "pruned")]
        lines.append(f"pruned - full held-out loss {loss.estimate:+.3f} [{loss.low:+.3f}, {loss.high:+.3f}] nats; "
                     f"KL {kl.estimate:.3f} [{kl.low:.3f}, {kl.high:.3f}]; tokens/s x {run.evaluation.speedup:.2f}")
    if run.heal is not None:
        rows = run.heal.to_dataframe().set_index(["metric", "stage"])
        gain = rows.loc[("loss", "after - before")]
        lines.append(f"healed ({run.heal.settings['steps']} steps, {run.heal.settings['mode']}, "
                     f"{run.heal.settings['loss']}) into {run.heal.folder}: held-out loss after - before "
                     f"{gain.estimate:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}] nats; saved folder "
                     f"{'proved' if run.heal.proved else 'NOT proved'}")
    return lines
