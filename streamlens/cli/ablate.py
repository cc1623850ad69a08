"""`streamlens ablate`: remove each block, sublayer or head in turn and measure the damage."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.attribution import ESTIMATE, EXACT_TOP, IG_STEPS, check_estimate_options
from streamlens.cli.common import (BOOTSTRAP, app, check_at_least, check_bootstrap, check_choice, fail, parse_ints,
                                   progress_bar, stdout_console)
from streamlens.cli.options import (Count, DataOptions, ModelOptions, OutputOptions, Sweep, data_group,
                                    model_group, output_group, uses)


def damage_table(result, title: str):
    """The most and least damaging units (up to five of each) with the first metric's 95% CI."""
    from rich.table import Table

    from streamlens.ablation import by_damage

    short = {"loss_increase": "loss +", "kl": "KL", "top1_agreement": "top-1 agree", "target_logit_change":
             "target logit", "target_prob_change": "target prob"}
    order = by_damage(result)
    table = Table(title=f"{title}; clean loss {float(result.clean_loss.mean()):.3f} nats; "
                        f"95% CI over {result.n_texts} texts")
    headers = ("", "unit", f"{short[result.metrics[0]]} [95% CI]", *(short[m] for m in result.metrics[1:]))
    for index, column in enumerate(headers):
        table.add_column(column, justify="right", no_wrap=index < 3)
    shown = min(5, (len(order) + 1) // 2)  # few units: split them between the two groups
    most = list(reversed(order[-shown:]))
    least = [i for i in order[:shown] if i not in most]
    for group, indices in (("most damaging", most), ("least damaging", least)):
        for rank, index in enumerate(indices):
            row = result.values[index]
            low, high = float(result.ci_low[index, 0]), float(result.ci_high[index, 0])
            table.add_row(group if rank == 0 else "", result.units[index],
                          f"{float(row[0]):.3f} [{low:.3f}, {high:.3f}]", *(f"{float(v):.3f}" for v in row[1:]))
        table.add_section()
    return table


@app.command()
@uses(model=model_group(),
      data=data_group(command="ablate", prompts=True,
                      window=Count(None, 2, help="Tokens per window of text (default 64; text data only)."),
                      max_windows=Count(None, 1, help="Most windows, taken round-robin over the texts (default 16; "
                                        "text data only).")),
      output=output_group(default="streamlens-out", help="Folder for ablation.csv, ablation.json, ablation.html."))
def ablate(
    model: ModelOptions,
    data: DataOptions = None,
    unit: str = typer.Option("block", "--unit", help="block, attn, mlp or head."),
    method: str = typer.Option("zero", "--method", help="zero, mean or resample."),
    effect: str = typer.Option("total", "--effect", help="total, direct, or both (adds a direct-vs-total figure)."),
    metrics: str = typer.Option(None, "--metrics", help="Comma list: loss_increase, kl, top1_agreement, "
                                "target_logit_change, target_prob_change (default: all that apply)."),
    cumulative: str = typer.Option("none", "--cumulative", help="none; order (remove units least damaging first, "
                                   "ranked by the sweep); greedy (re-rank after every removal; slow)."),
    layers: str = typer.Option(None, "--layers", help="Layers to ablate, e.g. 0-5,9 (default: all)."),
    heads: str = typer.Option(None, "--heads", help="Heads for --unit head, e.g. 0,3 (default: all)."),
    positions: str = typer.Option("all", "--positions", help="Predictions scored in each window: all, last, or "
                                  "a slice such as 8: (prompt sets: always the last position)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the resample donors and the bootstrap."),
    batch_size: int = typer.Option(None, "--batch-size", help="Most sequences in one forward (texts x variants; "
                                   "default 16, or chosen from free memory with --device cuda)."),
    n_boot: int = BOOTSTRAP,
    output: OutputOptions = None,
    workers: int = B.WORKERS,
    ray_address: str = B.RAY_ADDRESS,
    checkpoint: bool = B.CHECKPOINT,
    estimate: str = ESTIMATE,
    ig_steps: int = IG_STEPS,
    exact_top: int = EXACT_TOP,
    verify_top: int = typer.Option(0, "--verify-top", help="With --estimate: re-measure exactly the K units with "
                                   "the largest estimate; writes ablation_verify.csv (side by side)."),
    verify_all: bool = typer.Option(False, "--verify-all", help="With --estimate: re-measure every unit exactly."),
) -> None:
    """Remove each block, sublayer or head in turn and measure the damage, with 95% bootstrap CIs."""
    import time

    started = time.perf_counter()
    effects = _check_choices(unit, method, effect, cumulative)
    check_at_least(("--batch-size", batch_size, 1), ("--seed", seed, 0))
    metric_list = None if metrics is None else [name.strip() for name in metrics.split(",") if name.strip()]
    sweep = Sweep(unit, method, effects, cumulative, layers, heads, parse_ints("--layers", layers),
                  parse_ints("--heads", heads), metric_list, positions, seed, batch_size, n_boot)
    on_ray = B.check_backend_options(workers, ray_address, model.device)
    data = _check_data(data, positions, metric_list)
    check_bootstrap(n_boot)  # the one rule of every command (streamlens.limits), shared with EvalOptions
    check_estimate_options(estimate, ig_steps, exact_top, verify_top, verify_all)
    if estimate != "none":
        if on_ray:
            fail(f"--estimate {estimate} runs in this process: drop --workers / --ray-address")
        from streamlens.cli.attribution import ablate_estimate

        return ablate_estimate(sweep, model, data, output, estimate=estimate, ig_steps=ig_steps,
                               exact_top=exact_top, verify_top=verify_top, verify_all=verify_all,
                               started=started)
    ray = B.connect(workers, ray_address, model.device, model.threads) if on_ray else None
    try:
        _measure(sweep, model, data, output, ray, checkpoint, started)
    finally:
        if ray is not None:
            ray.close()


def _check_choices(unit: str, method: str, effect: str, cumulative: str) -> tuple[str, ...]:
    """Check the named choices; returns the effects to sweep (both: direct, then total)."""
    from streamlens import ablation as A

    check_choice("--unit", unit, A.UNIT_KINDS)
    check_choice("--method", method, A.METHODS)
    check_choice("--cumulative", cumulative, ("none", *A.CUMULATIVE_MODES))
    return ("direct", "total") if check_choice("--effect", effect, (*A.EFFECTS, "both")) == "both" else (effect,)


def _measure(sweep: Sweep, model: ModelOptions, data: DataOptions, output: OutputOptions, ray, checkpoint: bool,
             started: float) -> None:
    """Load, sweep (and the cumulative curve), write ablation.{csv,json,html}, print the damage table."""
    import time

    from rich.console import Console

    from streamlens import ablation as A
    from streamlens import data as D
    from streamlens.pages.ablation import ablation_files
    from streamlens.results import command_line

    try:
        threads = model.set_threads()  # this process; Ray workers get --threads or 1 each
        loaded = model.load(device="cpu" if ray is not None else None)  # on Ray the workers compute
        batch = D.load_batch(loaded, data.source, window=data.window, max_windows=data.max_windows,
                             positions=sweep.positions)
        A.units(loaded, sweep.unit, sweep.layer_list, sweep.head_list)  # layer and head ranges: checked before work
        batch_size = sweep.batch_size or _batch_size(ray, checkpoint, output.out, loaded, batch, model.device)
        options = A.EvalOptions(metrics=sweep.metrics, seed=sweep.seed, batch_size=batch_size, n_boot=sweep.n_boot,
                                threads=threads)
        identity = _identity(sweep, data, batch_size)
        if checkpoint:
            _check_resume(output.out, identity)
        backend, saved = B.backend_for(ray, checkpoint, output.out, loaded, batch, identity)
        command = command_line()
        results, curve = _sweeps(loaded, batch, sweep, options, command, Console(stderr=True), backend)
        last = results[sweep.effects[-1]]
        settings = {"command": command, "unit": sweep.unit, "method": sweep.method, "effect": sweep.effect,
                    "cumulative": sweep.cumulative, "positions": sweep.positions, "layers": sweep.layers or "all",
                    "heads": sweep.heads or ("all" if sweep.unit == "head" else None), "window": data.window,
                    "max_windows": data.max_windows, "batch_size": batch_size, "bootstrap": sweep.n_boot,
                    "seed": sweep.seed, "backend": last.provenance.backend}
        files = ablation_files(results, curve, batch, loaded, settings, time.perf_counter() - started)
    except (ValueError, OSError) as error:
        fail(str(error))
    folder = output.write(files)
    if saved is not None:
        saved.remove()  # the outputs are written: nothing left to resume
    stdout_console().print(damage_table(last, f"Removing one {sweep.unit} at a time ({sweep.method}, "
                                              f"{sweep.effects[-1]} effect)"))
    typer.echo(f"wrote {', '.join(files)} to {folder} in {time.perf_counter() - started:.1f} s")


def _batch_size(ray, checkpoint: bool, out: str, loaded, batch, device: str) -> int:
    """Resuming keeps the unfinished run's batch size; else 16, or what fits on the GPU."""
    return B.choose_batch_size(ray, loaded, batch, device, out if checkpoint else None)


# the settings that name a run for its checkpoint, and the option each comes from
RESUME_OPTIONS = {"unit": "--unit", "method": "--method", "effect": "--effect", "cumulative": "--cumulative",
                  "layers": "--layers", "heads": "--heads", "metrics": "--metrics", "seed": "--seed",
                  "batch_size": "--batch-size", "positions": "--positions", "window": "--window",
                  "max_windows": "--max-windows"}


def _identity(sweep: Sweep, data: DataOptions, batch_size: int) -> dict:
    metrics = None if sweep.metrics is None else ",".join(sweep.metrics)
    return {"unit": sweep.unit, "method": sweep.method, "effect": sweep.effect, "cumulative": sweep.cumulative,
            "layers": sweep.layers, "heads": sweep.heads, "metrics": metrics, "seed": sweep.seed,
            "batch_size": batch_size, "positions": sweep.positions, "window": data.window,
            "max_windows": data.max_windows}


def _check_resume(out: str, identity: dict) -> None:
    """An unfinished run in `out` made with other options: name the first option that differs."""
    from streamlens.ablation.backends import Checkpoint

    folder = B.checkpoint_folder(out)
    try:
        stored = Checkpoint.stored(folder)
    except ValueError as error:
        fail(str(error))
    for key, option in RESUME_OPTIONS.items():
        if stored is not None and key in stored and stored[key] != identity[key]:
            fail(f"checkpoint {folder} was made by another run: {option} {stored[key]} there, {identity[key]} now "
                 f"(give the same options to resume it, or start over with --no-checkpoint or another --out)")


def _check_data(data: DataOptions, positions: str, metrics: list[str] | None) -> DataOptions:
    """Check the options that depend on the data before any model loads; the defaults filled in."""
    from streamlens import data as D
    from streamlens.metrics import check_metrics

    if data.prompts and (data.window is not None or data.max_windows is not None):
        fail(f"--window/--max-windows apply to text data; --data {data.source} is a prompt set, scored at each "
             f"prompt's last position")
    try:
        if metrics is not None:
            check_metrics(metrics, has_targets=data.prompts)
        if not data.prompts:
            D.parse_positions(positions, (data.window or 64) - 1)
    except ValueError as error:
        fail(str(error))
    if data.prompts and positions.strip().lower() != "all":
        fail(f"--positions {positions!r}: positions apply to text windows; a prompt set is scored at each "
             f"prompt's last position")
    return data if data.prompts else DataOptions(data.source, data.window or 64, data.max_windows or 16)


def _sweeps(model, batch, sweep: Sweep, options, command, console, backend=None):
    """The sweep for each effect (and the cumulative curve) under one progress bar: (results, curve)."""
    from streamlens import ablation as A

    sites_list = A.units(model, sweep.unit, sweep.layer_list, sweep.head_list)
    n_chunks = -(-batch.n_texts // min(options.batch_size, batch.n_texts))
    total = len(sweep.effects) * len(sites_list) * n_chunks
    if sweep.cumulative != "none":
        total += A.cumulative_evaluations(len(sites_list), sweep.cumulative) * n_chunks
    with progress_bar(console) as bar:
        task = bar.add_task(f"ablating {len(sites_list)} {sweep.unit} units", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        results = {name: A.sweep(model, batch, sweep.unit, sweep.method, name, sweep.layer_list, sweep.head_list,
                                 options, progress=advance, command=command, backend=backend)
                   for name in sweep.effects}
        curve = None
        if sweep.cumulative != "none":
            ranked = [sites_list[i] for i in A.by_damage(results[sweep.effects[-1]])]
            curve = A.cumulative(model, batch, ranked, sweep.cumulative, sweep.method, sweep.effects[-1], options,
                                 progress=advance, command=command, backend=backend)
    return results, curve
