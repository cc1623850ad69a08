"""`streamlens report`: one self-contained HTML page with every standard figure."""

from __future__ import annotations

import typer

from streamlens.cli import backend as B
from streamlens.cli.common import app, fail
from streamlens.cli.options import (EXACT_DTYPES, DataOptions, ModelOptions, OutputOptions, PromptOptions, data_group,
                                    model_group, output_group, prompt_group, uses)


@app.command()
@uses(model=model_group(dtypes=EXACT_DTYPES, why="bfloat16 cannot keep the exact sums the report shows"),
      prompt=prompt_group(help="Prompt to decompose and lens.", target_help="Next token to explain, e.g. ' Paris' "
                          "(default: top prediction)."),
      data=data_group(command="report", default="prompts", prompts=True, note="What the ablations run on."),
      output=output_group(default="streamlens-out/report.html", help="The HTML file to write.", suffix=".html"))
def report(
    model: ModelOptions,
    prompt: PromptOptions = None,
    data: DataOptions = None,
    output: OutputOptions = None,
    lens: str = typer.Option(None, "--lens", help="A lens.safetensors from `streamlens lens train`: adds logit vs "
                             "tuned lens figures."),
    workers: int = B.WORKERS,
) -> None:
    """Write one self-contained HTML report (plotly.js inside; opens offline) with every standard figure."""
    import time

    started = time.perf_counter()
    on_ray = B.check_backend_options(workers, None, model.device)
    try:
        from streamlens.pages.report import standard_report

        trained = None
        if lens is not None:
            from streamlens.results.tunedlens import TunedLens

            try:
                trained = TunedLens.load(lens)
            except Exception as error:  # a missing file or one that is not a lens: say which
                raise ValueError(f"--lens {lens} is not a tuned lens from `streamlens lens train` ({error})") from None
        model.set_threads()
        ray = B.connect(workers, None, model.device, model.threads) if on_ray else None
        loaded = model.load()
        say = lambda line: typer.echo(f"[{time.perf_counter() - started:5.1f} s] {line}", err=True)  # noqa: E731
        try:
            page = standard_report(loaded, prompt=prompt.prompt, target=prompt.target, data=data.source, log=say,
                                   lens=trained, backend=ray).to_html()
        finally:
            if ray is not None:
                ray.close()
    except (ValueError, OSError) as error:
        fail(str(error))
    written = output.write({"report.html": page})
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
