"""Attribution patching (AtP) against the exact engine on SmolLM2, same process, same data.

For each (unit kind, method): the estimate (`ablation.attribute`, one clean forward for the means or
donors, one gradient forward and backward) and the exact sweep (`ablation.sweep`, one partial
forward per unit), timed back to back (wall and process CPU), then how well the estimate agrees with
the exact numbers on the loss increase: Spearman and Pearson over units with 95% bootstrap CIs over
texts, recall of the exact top 10 among the estimated top 20, the largest error of a unit's mean.
The estimate runs before any exact sweep, so the process's peak RSS after it (and its growth over
the loaded model) is the estimate's memory peak.

    python benchmarks/bench_attribution.py --threads 1                      # heads, blocks, attn, mlp
    python benchmarks/bench_attribution.py --units block,attn --methods mean --estimate atp-qk
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from streamlens import ablation as A
from streamlens.data import load_batch
from streamlens.model import load_model


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="block,attn,mlp,head", help="unit kinds, in the order run")
    parser.add_argument("--methods", default="mean,resample")
    parser.add_argument("--estimate", default="atp", choices=A.ESTIMATES)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    batch = load_batch(model, None, window=args.window, max_windows=args.max_windows)
    loaded = _rss_gb()
    print(f"{model!r}, torch threads {torch.get_num_threads()}; {batch.description}; estimate {args.estimate}; "
          f"peak RSS after loading {loaded:.2f} GB", flush=True)
    kinds, methods = args.units.split(","), args.methods.split(",")
    estimates = {}
    for kind in kinds:  # every estimate first: the RSS peak below is theirs
        for method in methods:
            estimates[kind, method] = _timed(lambda: A.attribute(model, batch, kind, method, estimate=args.estimate,
                                                                  command="bench"))
    print(f"estimate memory: peak RSS {_rss_gb():.2f} GB ({_rss_gb() - loaded:+.2f} GB over the loaded model)",
          flush=True)
    for kind in kinds:
        for method in methods:
            estimate, est_wall, est_cpu = estimates[kind, method]
            exact, wall, cpu = _timed(lambda: A.sweep(model, batch, kind, method, command="bench"))
            agree = A.agreement(estimate, exact, "loss_increase")
            rho, r = agree.spearman, agree.pearson
            print(f"{kind:5s} {method:8s} {len(exact.units):3d} units | estimate {est_wall:6.1f} s wall "
                  f"{est_cpu:6.1f} s cpu | exact {wall:7.1f} s wall {cpu:7.1f} s cpu | speed-up wall "
                  f"{wall / est_wall:5.1f}x cpu {cpu / est_cpu:5.1f}x | Spearman {rho[0]:.3f} [{rho[1]:.3f}, "
                  f"{rho[2]:.3f}] Pearson {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] | recall top {agree.top} in "
                  f"top {agree.among}: {agree.recall:.2f} | max |error| {agree.max_abs_error:.3f} nats "
                  f"(largest exact {float(exact.values[:, 0].abs().max()):.3f})", flush=True)


if __name__ == "__main__":
    main()
