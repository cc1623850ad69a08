"""The cost/accuracy frontier of the estimators on SmolLM2: process CPU seconds against Spearman,
Pearson (95% bootstrap CIs over texts) and recall of the exact top 10, per unit kind, method,
estimator and number of steps, with the exact sweep computed ONCE per (kind, method) and saved.

    python benchmarks/bench_estimates.py exact --save runs/est           # the exact sweeps (slow, once)
    python benchmarks/bench_estimates.py frontier --save runs/est        # every estimate, timed, saved
    python benchmarks/bench_estimates.py table --save runs/est            # the Markdown table (+ figure)
    python benchmarks/bench_estimates.py topk --save runs/est --top 10   # --exact-top on the heads

Small data on purpose (8 windows of 32 tokens): the machine is shared. CPU seconds come from
`resource.getrusage` (user + system of this process), not wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from streamlens import ablation as A
from streamlens.data import load_batch
from streamlens.model import load_model
from streamlens.results import AblationResult

STEPS = (1, 2, 4, 8, 16)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def timed(function):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def setup(args):
    torch.set_num_threads(args.threads)
    model = load_model()
    batch = load_batch(model, None, window=args.window, max_windows=args.max_windows)
    print(f"{model!r}; {batch.description}; threads {torch.get_num_threads()}", flush=True)
    return model, batch


def exact(args, folder: Path) -> None:
    """The exact sweep of each (kind, method), saved with its CPU seconds; skipped when saved already."""
    model, batch = setup(args)
    for kind in args.units.split(","):
        for method in args.methods.split(","):
            path = folder / f"exact_{kind}_{method}.safetensors"
            if path.exists():
                continue
            result, wall, cpu = timed(lambda: A.sweep(model, batch, kind, method, command="bench_estimates exact"))
            result.save(path)
            path.with_suffix(".json").write_text(json.dumps({"wall": wall, "cpu": cpu}))
            print(f"exact {kind} {method}: {len(result.units)} units {cpu:.1f} s cpu ({wall:.1f} s wall)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("exact", "frontier", "table", "topk"))
    parser.add_argument("--save", required=True, help="folder of the saved results")
    parser.add_argument("--units", default="head,block,attn,mlp")
    parser.add_argument("--methods", default="mean,resample")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    folder = Path(args.save)
    folder.mkdir(parents=True, exist_ok=True)
    {"exact": exact}[args.stage](args, folder)


if __name__ == "__main__":
    main()
