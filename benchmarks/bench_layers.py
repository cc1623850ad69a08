"""Adjacent-block swaps on SmolLM2: the engine extension against the naive loop, same process, same data.

naive:  for each swap (L, L+1), three full forwards whose hooks overwrite a stream (resid_pre L+1 := clean
        resid_pre L, read resid_post L+1; resid_pre L := that, read resid_post L; resid_pre L+2 := that,
        full logits), metrics from log-softmaxes (`metrics.token_metrics_from_logits`).
engine: `ablation.swap.evaluate` (the engine's cached clean pass, three `Model.run_to` calls that run only
        the blocks needed, chunked unembedding of the scored positions), including its bootstrap.

Runs alternate (naive, engine, then engine, naive, ...) so a busy spell on a shared machine hits both.
Prints median wall and process CPU time over --repeats rounds, their ratio, and the largest difference
of a per-text loss increase between the two.

    python benchmarks/bench_layers.py --windows 8 --window 32 --swaps 0-28 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamlens import sites
from streamlens.ablation import swap as SW
from streamlens.data import load_batch
from streamlens.metrics import per_text_means, token_metrics_from_logits
from streamlens.model import load_model
from streamlens.sites import parse_numbers


def _stream(model, tokens, name, hooks=()):
    kept = {}
    model.run(tokens, hooks=[*hooks, (name, lambda t, hook: kept.__setitem__("x", t))])
    return kept["x"]


def _put(tensor):
    return lambda t, hook: tensor


def naive(model, batch, layers) -> torch.Tensor:
    """[swap, text] loss increase with full forwards and hooks only."""
    tokens = batch.tokens
    clean_logits = model.run(tokens)
    text_index, position = batch.scored.nonzero(as_tuple=True)
    labels = batch.labels[text_index, position]
    out = []
    for layer in layers:
        x = _stream(model, tokens, sites.resid_pre(layer))
        a = _stream(model, tokens, sites.resid_post(layer + 1), [(sites.resid_pre(layer + 1), _put(x))])
        b = _stream(model, tokens, sites.resid_post(layer), [(sites.resid_pre(layer), _put(a))])
        logits = (model.final_logits(b) if layer + 2 == model.n_layers
                  else model.run(tokens, hooks=[(sites.resid_pre(layer + 2), _put(b))]))
        values = token_metrics_from_logits(clean_logits[text_index, position], logits[text_index, position], labels,
                                           None, ("loss_increase",))
        out.append(per_text_means(values, text_index, batch.n_texts)[0])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--swaps", default="0-28", help="first layers L of the swaps (L, L+1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    batch = load_batch(model, None, window=args.window, max_windows=args.windows)
    layers = parse_numbers(args.swaps, "--swaps", model.n_layers - 1)
    specs = [SW.Swap(layer) for layer in layers]
    times = {"naive": [], "engine": []}
    results = {}
    for round_ in range(args.repeats):
        for name in (("naive", "engine") if round_ % 2 == 0 else ("engine", "naive")):
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                if name == "naive":
                    results[name] = naive(model, batch, layers)
                else:
                    results[name] = SW.evaluate(model, batch, specs, metrics=("loss_increase",),
                                                n_boot=200).per_text[:, 0]
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    for name, values in times.items():
        print(f"{name:>7}: median wall {statistics.median(w for w, _ in values):.2f} s, "
              f"cpu {statistics.median(c for _, c in values):.2f} s over {args.repeats} rounds")
    ratio = statistics.median(c for _, c in times["naive"]) / statistics.median(c for _, c in times["engine"])
    print(f"engine is {ratio:.2f}x faster (CPU time) for {len(specs)} swaps on {batch.description}; "
          f"largest difference of a per-text loss increase: {float((results['naive'] - results['engine'].to(results['naive'].dtype)).abs().max()):.2e}")


if __name__ == "__main__":
    main()
