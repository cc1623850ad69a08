"""Greedy cumulative removal on SmolLM2: each candidate restarted from the removed units' stream
(`ablation.engine.Added`, what `cumulative(mode="greedy")` does) against restarting every candidate
at the earliest removed unit (plain `Ablation`s of the whole set, the previous path), same engine,
same process, same data.

Each step's candidates are scored both ways on one engine (the clean pass is shared and cached);
rounds alternate the order so a busy spell on a shared machine hits both. Prints process CPU
seconds of each path, their ratio, and whether the per-text values are bit-identical.

    python benchmarks/bench_greedy.py --kind attn --pool 8 --windows 8 --window 32 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from streamlens import ablation as A
from streamlens import metrics as M
from streamlens.ablation.engine import Added, Engine
from streamlens.data import load_batch
from streamlens.model import load_model
from streamlens.sites import Site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kind", default="attn", choices=("attn", "mlp", "head"))
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    batch = load_batch(model, None, window=args.window, max_windows=args.windows)
    pool = [Site(args.kind, layer) for layer in range(0, model.n_layers, max(1, model.n_layers // args.pool))][: args.pool]
    engine = Engine(model, batch, ("loss_increase",), seed=0, batch_size=args.batch_size)
    seconds = {"restart from removed units": 0.0, "restart at earliest unit": 0.0}
    identical = True
    remaining, removed = list(pool), []
    while remaining:
        base = A.Ablation(tuple(removed), "zero", "total")
        fast = [Added(base, site) if removed else A.Ablation((site,)) for site in remaining]
        plain = [A.Ablation((*removed, site)) for site in remaining]
        values = {}
        order = list(seconds) if len(removed) % 2 == 0 else list(reversed(seconds))
        for name in order:
            started = time.process_time()
            values[name] = engine.per_text(fast if name.startswith("restart from") else plain)
            seconds[name] += time.process_time() - started
        identical &= torch.equal(*values.values())
        damage = M.damage("loss_increase", values["restart at earliest unit"][:, 0].mean(-1))
        removed.append(remaining.pop(int(torch.argmin(damage))))
    for name, value in seconds.items():
        print(f"{name:28s} {value:8.1f} s CPU")
    print(f"ratio {seconds['restart at earliest unit'] / seconds['restart from removed units']:.2f}x; "
          f"removal order {[site.label for site in removed]}; per-text values bit-identical: {identical}")


if __name__ == "__main__":
    main()
