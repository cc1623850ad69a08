"""Single-unit block sweep on SmolLM2: the engine against the naive loop, same process, same data.

naive:   for each layer, one full forward with hooks that zero attn_out L and mlp_out L, full logits
         [n, pos, vocab], metrics from log-softmaxes (streamlens.metrics.token_metrics_from_logits).
restart: the same, but each forward starts at layer L+1 from the cached clean resid_pre L
         (model.run(..., start_at_layer=L+1)); full logits and the same metrics. Shows how much of the
         gain comes from skipping blocks alone.
engine:  streamlens.ablation.sweep (restart, stop at the final stream, chunked unembedding of the
         scored positions only, no [n, pos, vocab] tensor), including its clean pass and bootstrap.

Runs are interleaved (naive, restart, engine, then rotated) so that a busy spell on a shared machine
hits all three. Prints the median wall time and process CPU time of each over --repeats rounds, the
ratios, and the largest difference of any per-text metric value between the naive loop and the
engine (and restart).

    python benchmarks/bench_ablation.py                 # 16 windows x 64 tokens (the CLI default)
    python benchmarks/bench_ablation.py --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamlens import ablation as A
from streamlens import sites
from streamlens.data import load_batch
from streamlens.metrics import TEXT_METRICS, per_text_means, token_metrics_from_logits
from streamlens.model import load_model


def _zero(tensor, hook):
    return torch.zeros_like(tensor)


def naive(model, batch, restart: bool) -> torch.Tensor:
    """[unit, metric, text] with one forward per block (full, or restarted at L+1)."""
    text_index, position = batch.scored.nonzero(as_tuple=True)
    labels = batch.labels[text_index, position]
    resid = {}
    keep = [(sites.resid_pre(L), lambda t, hook, L=L: resid.__setitem__(L, t.clone())) for L in range(model.n_layers)]
    clean = model.run(batch.tokens, hooks=keep if restart else [])[text_index, position]
    out = []
    for layer in range(model.n_layers):
        if restart:  # block L zeroed: the stream leaving it is the stream entering it
            logits = (model.run(resid[layer], start_at_layer=layer + 1) if layer + 1 < model.n_layers
                      else model.final_logits(resid[layer]))
        else:
            hooks = [(sites.attn_out(layer), _zero), (sites.mlp_out(layer), _zero)]
            logits = model.run(batch.tokens, hooks=hooks)
        values = token_metrics_from_logits(clean, logits[text_index, position], labels, None, TEXT_METRICS)
        out.append(per_text_means(values, text_index, batch.n_texts))
    return torch.stack(out)


def timed_interleaved(functions: dict, repeats: int) -> dict:
    """Run the functions in turn, `repeats` rounds (rotating who goes first, so a slow spell on a
    shared machine hits all of them alike); keep wall and process-CPU seconds of every run."""
    runs = {name: {"wall": [], "cpu": [], "result": None} for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]["result"] = functions[name]()
            runs[name]["wall"].append(time.perf_counter() - wall)
            runs[name]["cpu"].append(time.process_time() - cpu)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(device=args.device)
    batch = load_batch(model, None, window=args.window, max_windows=args.max_windows)
    print(f"{model!r} on {args.device}, torch threads {torch.get_num_threads()}; {batch.description}; "
          f"{model.n_layers} single-block zero ablations (total effect); median of {args.repeats} runs")
    functions = {
        "naive": lambda: naive(model, batch, restart=False),
        "restart": lambda: naive(model, batch, restart=True),
        "engine": lambda: A.sweep(model, batch, "block", n_boot=1000, command="bench"),
    }
    with torch.inference_mode():
        runs = timed_interleaved(functions, args.repeats)
    wall = {name: statistics.median(run["wall"]) for name, run in runs.items()}
    cpu = {name: statistics.median(run["cpu"]) for name, run in runs.items()}
    for name, run in runs.items():
        print(f"{name:8s} wall {wall[name]:8.2f} s  (runs {', '.join(f'{t:.2f}' for t in run['wall'])})   "
              f"cpu {cpu[name]:8.2f} s")
    print(f"ratio naive / engine : wall {wall['naive'] / wall['engine']:.2f}x   cpu {cpu['naive'] / cpu['engine']:.2f}x")
    print(f"ratio naive / restart: wall {wall['naive'] / wall['restart']:.2f}x   cpu {cpu['naive'] / cpu['restart']:.2f}x")
    naive_values, restart_values = runs["naive"]["result"], runs["restart"]["result"]
    result = runs["engine"]["result"]
    print(f"max |naive - engine|  over {naive_values.numel()} per-text values: "
          f"{float((naive_values - result.per_text).abs().max()):.2e}")
    print(f"max |naive - restart| over {naive_values.numel()} per-text values: "
          f"{float((naive_values - restart_values).abs().max()):.2e}")
    print(f"max |naive - engine| of the reported means: "
          f"{float((naive_values.mean(-1) - result.values).abs().max()):.2e}")


if __name__ == "__main__":
    main()
