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

def _ablate_ints(option: str, text: str | None) -> list[int] | None:
    """'0-5,9' -> [0, 1, 2, 3, 4, 5, 9]; None stays None (all)."""
    if text is None:
        return None
    values: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            values += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    except ValueError:
        fail(f"{option} {text!r} not understood: use numbers and ranges such as 0-5,9")
    return values


def _ablate_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(f"unknown {option} {value!r}: choose from {', '.join(choices)}")
    return value


def _damage_table(result, title: str):
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
    model: str = typer.Option(None, "--model", help="'smollm2' (default), a .gguf file, an HF folder or name."),
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
    batch_size: int = typer.Option(16, "--batch-size", help="Most sequences in one forward (texts x variants)."),
    window: int = typer.Option(64, "--window", help="Tokens per window of text."),
    max_windows: int = typer.Option(16, "--max-windows", help="Most windows (taken round-robin over the texts)."),
    n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates for the 95% CIs (over texts)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 is often "
                                "faster on a busy shared machine)."),
    out: str = typer.Option("streamlens-out", "--out", help="Folder for ablation.csv, ablation.json, ablation.html."),
) -> None:
    """Remove each block, sublayer or head in turn and measure the damage, with 95% bootstrap CIs."""
    import time
    from pathlib import Path

    started = time.perf_counter()
    from streamlens import ablation as A

    _ablate_choice("--unit", unit, A.UNIT_KINDS)
    _ablate_choice("--method", method, A.METHODS)
    effects = ("direct", "total") if _ablate_choice("--effect", effect, (*A.EFFECTS, "both")) == "both" else (effect,)
    _ablate_choice("--cumulative", cumulative, ("none", *A.CUMULATIVE_MODES))
    layer_list, head_list = _ablate_ints("--layers", layers), _ablate_ints("--heads", heads)
    metric_list = None if metrics is None else [name.strip() for name in metrics.split(",") if name.strip()]
    for option, value, least in (("--batch-size", batch_size, 1), ("--bootstrap", n_boot, 1),
                                 ("--threads", 1 if threads is None else threads, 1)):
        if value < least:
            fail(f"{option} {value} must be at least {least}")
    options = A.EvalOptions(metrics=metric_list, seed=seed, batch_size=batch_size, n_boot=n_boot, threads=threads)
    try:
        from streamlens.files import check_out_dir

        check_out_dir(out)
    except ValueError as error:
        fail(str(error))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    try:
        from streamlens import data as D
        from streamlens.files import prepare_out_dir, write_atomic
        from streamlens.model import load_model
        from streamlens.results import command_line

        D.check_source(data)
        loaded = load_model(model, dtype=dtype, device=device)
        batch = D.load_batch(loaded, data, window=window, max_windows=max_windows, positions=positions)
        sites_list = A.units(loaded, unit, layer_list, head_list)
        command = command_line()
        n_chunks = -(-batch.n_texts // min(batch_size, batch.n_texts))
        total = len(effects) * len(sites_list) * n_chunks
        if cumulative != "none":
            total += A.cumulative_evaluations(len(sites_list), cumulative) * n_chunks
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"ablating {len(sites_list)} {unit} units", total=total)
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            results = {name: A.sweep(loaded, batch, unit, method, name, layer_list, head_list, options,
                                     progress=advance, command=command) for name in effects}
            main_result = results[effects[-1]]
            curve = None
            if cumulative != "none":
                ranked = [sites_list[i] for i in A.by_damage(main_result)]
                curve = A.cumulative(loaded, batch, ranked, cumulative, method, effects[-1], options,
                                     progress=advance, command=command)
    except (ValueError, OSError) as error:
        fail(str(error))

    settings = {"command": command, "unit": unit, "method": method, "effect": effect, "cumulative": cumulative,
                "positions": positions, "layers": layers or "all", "heads": heads or ("all" if unit == "head" else None),
                "window": window, "max_windows": max_windows, "batch_size": batch_size, "bootstrap": n_boot,
                "seed": seed}
    try:
        from streamlens.pages.ablation import ablation_files

        files = ablation_files(results, curve, batch, loaded, settings, time.perf_counter() - started)
        folder = prepare_out_dir(out)
        for name, content in files.items():
            write_atomic(Path(folder) / name, content)
    except (ValueError, OSError) as error:
        fail(str(error))
    seconds = time.perf_counter() - started

    Console().print(_damage_table(main_result, f"Removing one {unit} at a time ({method}, {effects[-1]} effect)"))
    typer.echo(f"wrote {', '.join(files)} to {folder} in {seconds:.1f} s")


# ----- report (issue 5) --------------------------------------------------------------------------

@app.command()
def report(
    model: str = typer.Option(None, "--model", help="'smollm2' (default), a .gguf file or an HF folder."),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to decompose and lens."),
    target: str = typer.Option(None, "--target", help="Next token to explain, e.g. ' Paris' (default: top prediction)."),
    data: str = typer.Option("prompts", "--data", help="What the ablations run on: prompts (built-in prompt set), "
                             "builtin (built-in text), a .txt/.jsonl file or a literal text."),
    out: str = typer.Option("streamlens-out/report.html", "--out", help="The HTML file to write."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
) -> None:
    """Write one self-contained HTML report (plotly.js inside; opens offline) with every standard figure."""
    import time

    started = time.perf_counter()
    try:
        from streamlens.model import load_model
        from streamlens.data import check_source
        from streamlens.pages.html import check_out_path
        from streamlens.pages.report import standard_report

        path = check_out_path(out)
        check_source(data)
        loaded = load_model(model, dtype=dtype, device=device)
        say = lambda line: typer.echo(f"[{time.perf_counter() - started:5.1f} s] {line}", err=True)  # noqa: E731
        written = standard_report(loaded, prompt=prompt, target=target, data=data, log=say).write(path)
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
        from streamlens.pages import highway as pages
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
            "summary": pages.summary(toy, real)}
    try:
        csv_text = pages.tidy(toy, real).to_csv(index=False)
        html_text = pages.highway_report(toy, real, facts).to_html()
        for name, content in (("highway.csv", csv_text), ("highway.json", json.dumps(meta, indent=2) + "\n"),
                              ("highway.html", html_text)):
            write_atomic(folder / name, content)
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
