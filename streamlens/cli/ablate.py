"""`streamlens ablate`: remove each block, sublayer or head in turn and measure the damage."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.attribution import ESTIMATE, EXACT_TOP, IG_STEPS, check_estimate_options
from streamlens.cli.common import (MIN_BOOTSTRAP, MODEL_HELP, THREADS_HELP, VERIFY_HELP, app, check_at_least,
                                   check_choice, check_out, fail, parse_ints, progress_bar, use_threads)


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
def ablate(
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    data: str = typer.Option(None, "--data", help="builtin (default: prose and code in data/), prompts (built-in "
                             "prompt/target set), a .txt file, a .jsonl file ({\"text\"} or {\"prompt\", \"target\"} "
                             "lines), or a literal text."),
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
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    seed: int = typer.Option(0, "--seed", help="Seeds the resample donors and the bootstrap."),
    batch_size: int = typer.Option(None, "--batch-size", help="Most sequences in one forward (texts x variants; "
                                   "default 16, or chosen from free memory with --device cuda)."),
    window: int = typer.Option(None, "--window", help="Tokens per window of text (default 64; text data only)."),
    max_windows: int = typer.Option(None, "--max-windows", help="Most windows, taken round-robin over the texts "
                                    "(default 16; text data only)."),
    n_boot: int = typer.Option(1000, "--bootstrap", help=f"Bootstrap replicates for the 95% CIs (over texts; at "
                               f"least {MIN_BOOTSTRAP})."),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    out: str = typer.Option("streamlens-out", "--out", help="Folder for ablation.csv, ablation.json, ablation.html."),
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
    from streamlens import ablation as A

    check_choice("--unit", unit, A.UNIT_KINDS)
    check_choice("--method", method, A.METHODS)
    effects = ("direct", "total") if check_choice("--effect", effect, (*A.EFFECTS, "both")) == "both" else (effect,)
    check_choice("--cumulative", cumulative, ("none", *A.CUMULATIVE_MODES))
    layer_list, head_list = parse_ints("--layers", layers), parse_ints("--heads", heads)
    metric_list = None if metrics is None else [name.strip() for name in metrics.split(",") if name.strip()]
    check_at_least(("--batch-size", batch_size, 1), ("--bootstrap", n_boot, MIN_BOOTSTRAP), ("--window", window, 2),
                   ("--max-windows", max_windows, 1), ("--seed", seed, 0))
    check_out(out)
    on_ray = B.check_backend_options(workers, ray_address, device)
    try:
        prompts = _check_data(data, window, max_windows, positions, metric_list)
    except (ValueError, OSError) as error:
        fail(str(error))
    check_estimate_options(estimate, ig_steps, exact_top, verify_top, verify_all)
    if estimate != "none":
        if on_ray:
            fail(f"--estimate {estimate} runs in this process: drop --workers / --ray-address")
        from streamlens.cli.attribution import ablate_estimate

        options = A.EvalOptions(metrics=metric_list, seed=seed, batch_size=batch_size or 16, n_boot=n_boot,
                                threads=use_threads(threads))
        window, max_windows = (None, None) if prompts else (window or 64, max_windows or 16)
        return ablate_estimate(options, estimate=estimate, ig_steps=ig_steps, exact_top=exact_top,
                               verify_top=verify_top, verify_all=verify_all,
                               effect=effect, cumulative=cumulative, model=model, data=data, unit=unit,
                               method=method, layers=layer_list, heads=head_list, positions=positions,
                               device=device, dtype=dtype, window=window or 64, max_windows=max_windows, out=out,
                               started=started)
    from rich.console import Console

    from streamlens import data as D
    from streamlens.files import write_outputs
    from streamlens.model import load_model
    from streamlens.pages.ablation import ablation_files
    from streamlens.results import command_line

    used_threads = use_threads(threads)  # this process; Ray workers get --threads or 1 each
    ray = B.connect(workers, ray_address, device, threads) if on_ray else None
    try:
        loaded = load_model(model, dtype=dtype, device="cpu" if on_ray else device, verify=verify)  # on Ray the workers compute
        window, max_windows = (None, None) if prompts else (window or 64, max_windows or 16)
        batch = D.load_batch(loaded, data, window=window or 64, max_windows=max_windows, positions=positions)
        A.units(loaded, unit, layer_list, head_list)  # layer and head ranges: checked before any work
        if batch_size is None:  # resuming keeps the unfinished run's; else 16, or what fits on the GPU
            batch_size = (checkpoint and B.stored_batch_size(out)) or B.choose_batch_size(ray, loaded, batch, device)
        options = A.EvalOptions(metrics=metric_list, seed=seed, batch_size=batch_size, n_boot=n_boot,
                                threads=used_threads)
        identity = {"unit": unit, "method": method, "effect": effect, "cumulative": cumulative, "layers": layers,
                    "heads": heads, "metrics": metrics, "seed": seed, "batch_size": batch_size}
        backend, saved = B.backend_for(ray, checkpoint, out, loaded, batch, identity)
        command = command_line()
        results, curve = _sweeps(loaded, batch, unit, method, effects, layer_list, head_list, cumulative, options,
                                 command, Console(stderr=True), backend)
        settings = {"command": command, "unit": unit, "method": method, "effect": effect, "cumulative": cumulative,
                    "positions": positions, "layers": layers or "all", "heads": heads or ("all" if unit == "head"
                    else None), "window": window, "max_windows": max_windows, "batch_size": batch_size,
                    "bootstrap": n_boot, "seed": seed, "backend": results[effects[-1]].provenance.backend}
        files = ablation_files(results, curve, batch, loaded, settings, time.perf_counter() - started)
        folder = write_outputs(out, files)
    except (ValueError, OSError) as error:
        fail(str(error))
    finally:
        if ray is not None:
            ray.close()
    if saved is not None:
        saved.remove()  # the outputs are written: nothing left to resume
    Console().print(damage_table(results[effects[-1]], f"Removing one {unit} at a time ({method}, {effects[-1]} "
                                                       f"effect)"))
    typer.echo(f"wrote {', '.join(files)} to {folder} in {time.perf_counter() - started:.1f} s")


def _check_data(data, window, max_windows, positions, metrics) -> bool:
    """Check the data source and the options that depend on it before any model loads; True for a prompt set."""
    from streamlens import data as D
    from streamlens.metrics import check_metrics

    prompts = D.is_prompt_source(data)
    if prompts and (window is not None or max_windows is not None):
        fail(f"--window/--max-windows apply to text data; --data {data} is a prompt set, scored at each "
             f"prompt's last position")
    D.check_source(data)
    if metrics is not None:
        check_metrics(metrics, has_targets=prompts)
    if not prompts:
        D.parse_positions(positions, (window or 64) - 1)
    elif positions.strip().lower() != "all":
        fail(f"--positions {positions!r}: positions apply to text windows; a prompt set is scored at each "
             f"prompt's last position")
    return prompts


def _sweeps(model, batch, unit, method, effects, layers, heads, cumulative, options, command, console, backend=None):
    """The sweep for each effect (and the cumulative curve) under one progress bar: (results, curve)."""
    from streamlens import ablation as A

    sites_list = A.units(model, unit, layers, heads)
    n_chunks = -(-batch.n_texts // min(options.batch_size, batch.n_texts))
    total = len(effects) * len(sites_list) * n_chunks
    if cumulative != "none":
        total += A.cumulative_evaluations(len(sites_list), cumulative) * n_chunks
    with progress_bar(console) as bar:
        task = bar.add_task(f"ablating {len(sites_list)} {unit} units", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        results = {name: A.sweep(model, batch, unit, method, name, layers, heads, options, progress=advance,
                                 command=command, backend=backend) for name in effects}
        curve = None
        if cumulative != "none":
            ranked = [sites_list[i] for i in A.by_damage(results[effects[-1]])]
            curve = A.cumulative(model, batch, ranked, cumulative, method, effects[-1], options, progress=advance,
                                 command=command, backend=backend)
    return results, curve
