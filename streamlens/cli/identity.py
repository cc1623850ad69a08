"""`streamlens identity`: how much of each input token the stream carries, and where attention reads from."""

from __future__ import annotations

import typer

from streamlens.cli.common import MODEL_HELP, app, fail, progress_bar


@app.command()
def identity(
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    data: str = typer.Option(None, "--data", help="Texts: builtin (default), a .txt/.jsonl file or a literal text "
                             "(at least two texts: the probe is scored on texts it was not fitted on)."),
    window: int = typer.Option(64, "--window", help="Tokens per window of text."),
    max_per_text: int = typer.Option(1, "--max-per-text", help="Most windows per text: 1 (default) is a quick "
                                     "look; 0 takes every window (the full study, about 3x the time on builtin)."),
    remove_skips: str = typer.Option("0,10,20", "--remove-skips", help="Blocks whose skip is removed, one condition "
                                     "each, e.g. 0,10,20 or 5-7 (none: no counterfactual)."),
    alpha: float = typer.Option(0.1, "--alpha", help="Ridge penalty per training token (standardised features)."),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt for the attention-source split."),
    target: str = typer.Option(None, "--target", help="Token whose logit is split, e.g. ' Paris' (default: top)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap over texts."),
    out: str = typer.Option("streamlens-out/identity", "--out", help="Folder for identity.csv, .json and .html."),
) -> None:
    """Token identity per layer (probe, embedding read-out, cosine; skips removed) and attention sources."""
    import time

    started = time.perf_counter()
    try:
        from streamlens.corpus import text_windows
        from streamlens.files import check_out_dir, write_outputs
        from streamlens.identity import token_identity
        from streamlens.model import load_model
        from streamlens.pages.carry import identity_files, identity_summary
        from streamlens.results import command_line
        from streamlens.highway import parse_layers
        from streamlens.sources import attention_sources

        check_out_dir(out)
        if window < 2 or (max_per_text is not None and max_per_text < 0) or not alpha > 0:
            raise ValueError(f"--window {window}, --max-per-text {max_per_text}, --alpha {alpha}: need window >= 2, "
                             "max-per-text >= 0 (0: all), alpha > 0")
        from streamlens.data import load_texts

        if len(load_texts(data)) < 2:
            raise ValueError(f"--data {data!r} holds one text: the probe needs at least two (fitted on one, scored on another)")
        loaded = load_model(model)
        removed = parse_layers(remove_skips, loaded.n_layers)
        tokens = loaded.to_tokens(prompt)
        if target is not None:
            loaded.token_id(target)
        windows = text_windows(loaded, data, window, max_per_text or None)
        if len(windows.text_of.unique()) < 2:
            raise ValueError(f"only one text of --data is at least --window {window} tokens long: use a shorter window")
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    with progress_bar(transient=False) as progress:
        task = progress.add_task(f"{loaded.info.name}: identity conditions", total=1 + len(removed))
        result = token_identity(loaded, windows, removed, alpha=alpha, seed=seed, command=command,
                                on_condition=lambda: progress.advance(task))
    sources = attention_sources(loaded, tokens, target, command=command)
    seconds = time.perf_counter() - started
    try:
        folder = write_outputs(out, identity_files(result, sources, command, seconds))
    except (ValueError, OSError) as error:
        fail(str(error))
    summary = identity_summary(result)
    for target_name in result.targets:
        for stage, row in summary[target_name].items():
            typer.echo(f"{target_name:>8} token, {stage:<40} probe top-1 {row['probe_top1']:.3f}  top-5 "
                       f"{row['probe_top5']:.3f}  (majority {row['majority']:.3f})")
    for src, value, heads in sources.top_sources(3):
        typer.echo(f"source {src} {sources.token_strings[src]!r} -> {sources.target_string!r}: {value:+.3f} via "
                   + ", ".join(f"{site.label} {part:+.3f}" for site, part in heads))
    typer.echo(f"wrote {folder}/identity.csv, identity_sources.csv, identity.json, identity.html in {seconds:.1f} s")
