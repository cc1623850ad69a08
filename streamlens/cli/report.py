"""`streamlens report`: one self-contained HTML page with every standard figure."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.common import MODEL_HELP, THREADS_HELP, VERIFY_HELP, app, fail, use_threads


@app.command()
def report(
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to decompose and lens."),
    target: str = typer.Option(None, "--target", help="Next token to explain, e.g. ' Paris' (default: top prediction)."),
    data: str = typer.Option("prompts", "--data", help="What the ablations run on: prompts (built-in prompt set), "
                             "builtin (built-in text), a .txt/.jsonl file or a literal text."),
    out: str = typer.Option("streamlens-out/report.html", "--out", help="The HTML file to write."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64 (bfloat16 cannot keep the exact sums "
                              "the report shows)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    lens: str = typer.Option(None, "--lens", help="A lens.safetensors from `streamlens lens train`: adds logit vs "
                             "tuned lens figures."),
    workers: int = B.WORKERS,
) -> None:
    """Write one self-contained HTML report (plotly.js inside; opens offline) with every standard figure."""
    import time

    started = time.perf_counter()
    if dtype == "bfloat16":  # refused before loading: its 8-bit mantissa breaks the exact sums
        fail("--dtype bfloat16 is not offered by report: the decomposition must sum exactly; use float32 or float64")
    on_ray = B.check_backend_options(workers, None, device)
    try:
        from streamlens.data import check_source
        from streamlens.files import write_outputs
        from streamlens.model import load_model
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
        use_threads(threads)
        ray = B.connect(workers, None, device, threads) if on_ray else None
        loaded = load_model(model, dtype=dtype, device=device, verify=verify)
        say = lambda line: typer.echo(f"[{time.perf_counter() - started:5.1f} s] {line}", err=True)  # noqa: E731
        try:
            page = standard_report(loaded, prompt=prompt, target=target, data=data, log=say, lens=trained,
                                   backend=ray).to_html()
        finally:
            if ray is not None:
                ray.close()
        written = write_outputs(path.parent, {path.name: page}, set_name=path.name) / path.name
    except (ValueError, OSError) as error:
        fail(str(error))
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
