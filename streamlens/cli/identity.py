"""`streamlens identity`: how much of each input token the stream carries, and where attention reads from."""

from __future__ import annotations

import typer

from streamlens.cli.common import app, fail, progress_bar
from streamlens.cli.options import (EXACT_DTYPES, Count, DataOptions, ModelOptions, OutputOptions, PromptOptions,
                                    data_group, model_group, output_group, prompt_group, uses)


@app.command()
@uses(model=model_group(dtypes=EXACT_DTYPES, why="the attention-source split must sum exactly"),
      data=data_group(command="identity", window=Count(64, 2), note="At least two texts: the probe is scored on "
                      "texts it was not fitted on."),
      prompt=prompt_group(help="Prompt for the attention-source split.", target_help="Token whose logit is split, "
                          "e.g. ' Paris' (default: top)."),
      output=output_group(default="streamlens-out/identity", help="Folder for identity.csv, .json and .html."))
def identity(
    model: ModelOptions,
    data: DataOptions = None,
    max_per_text: int = typer.Option(1, "--max-per-text", help="Most windows per text: 1 (default) is a quick "
                                     "look; 0 takes every window (the full study, about 3x the time on builtin)."),
    remove_skips: str = typer.Option("0,10,20", "--remove-skips", help="Blocks whose skip is removed, one condition "
                                     "each, e.g. 0,10,20 or 5-7 (none: no counterfactual)."),
    alpha: float = typer.Option(0.1, "--alpha", help="Ridge penalty per training token (standardised features)."),
    prompt: PromptOptions = None,
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap over texts."),
    output: OutputOptions = None,
) -> None:
    """Token identity per layer (probe, embedding read-out, cosine; skips removed) and attention sources."""
    import time

    started = time.perf_counter()
    if max_per_text < 0:
        fail(f"--max-per-text {max_per_text} must be at least 0 (0: every window)")
    try:
        from streamlens.data import load_texts, text_windows
        from streamlens.identity import check_alpha, token_identity
        from streamlens.pages.identity import identity_files, identity_summary
        from streamlens.results import command_line
        from streamlens.sites import parse_layers
        from streamlens.sources import attention_sources

        check_alpha(alpha)
        if len(load_texts(data.source)) < 2:
            raise ValueError(f"--data {data.source!r} is one text: the probe needs at least two (fitted on some, "
                             f"scored on others): give a .txt/.jsonl file of several texts, or builtin")
        model.set_threads()
        loaded = model.load()
        removed = parse_layers(remove_skips, loaded.n_layers)
        tokens = loaded.to_tokens(prompt.prompt)
        if prompt.target is not None:
            loaded.token_id(prompt.target)
        windows = text_windows(loaded, data.source, data.window, max_per_text or None)
        if len(windows.text_of.unique()) < 2:
            raise ValueError(f"only one text of --data is at least --window {data.window} tokens long: use a shorter "
                             f"window")
    except (ValueError, OSError) as error:
        fail(str(error))

    command = command_line()
    with progress_bar(transient=False) as progress:
        task = progress.add_task(f"{loaded.info.name}: identity conditions", total=1 + len(removed))
        result = token_identity(loaded, windows, removed, alpha=alpha, seed=seed, command=command,
                                on_condition=lambda: progress.advance(task))
    sources = attention_sources(loaded, tokens, prompt.target, command=command)
    seconds = time.perf_counter() - started
    folder = output.write(identity_files(result, sources, command, seconds))
    summary = identity_summary(result)
    for target_name in result.targets:
        for stage, row in summary[target_name].items():
            typer.echo(f"{target_name:>8} token, {stage:<40} probe top-1 {row['probe_top1']:.3f}  top-5 "
                       f"{row['probe_top5']:.3f}  (majority {row['majority']:.3f})")
    for src, value, heads in sources.top_sources(3):
        typer.echo(f"source {src} {sources.token_strings[src]!r} -> {sources.target_string!r}: {value:+.3f} via "
                   + ", ".join(f"{site.label} {part:+.3f}" for site, part in heads))
    typer.echo(f"wrote {folder}/identity.csv, identity_sources.csv, identity.json, identity.html in {seconds:.1f} s")
