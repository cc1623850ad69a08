"""`streamlens report`: one self-contained HTML page with every standard figure."""

from __future__ import annotations

import typer

from streamlens.cli.common import MODEL_HELP, app, fail


@app.command()
def report(
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to decompose and lens."),
    target: str = typer.Option(None, "--target", help="Next token to explain, e.g. ' Paris' (default: top prediction)."),
    data: str = typer.Option("prompts", "--data", help="What the ablations run on: prompts (built-in prompt set), "
                             "builtin (built-in text), a .txt/.jsonl file or a literal text."),
    out: str = typer.Option("streamlens-out/report.html", "--out", help="The HTML file to write."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    lens: str = typer.Option(None, "--lens", help="A lens.safetensors from `streamlens lens train`: adds logit vs "
                             "tuned lens figures."),
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
        trained = None
        if lens is not None:
            from streamlens.results.tunedlens import TunedLens

            try:
                trained = TunedLens.load(lens)
            except Exception as error:  # a missing file or one that is not a lens: say which
                raise ValueError(f"--lens {lens} is not a tuned lens from `streamlens lens train` ({error})") from None
        loaded = load_model(model, dtype=dtype, device=device)
        say = lambda line: typer.echo(f"[{time.perf_counter() - started:5.1f} s] {line}", err=True)  # noqa: E731
        written = standard_report(loaded, prompt=prompt, target=target, data=data, log=say, lens=trained).write(path)
    except (ValueError, OSError) as error:
        fail(str(error))
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
