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

On a busy shared machine the exact head sweep can be split over processes by layers and merged
(process CPU times add up; the exact results of the parts are concatenated unit by unit):

    python benchmarks/bench_attribution.py --units head --methods mean --save runs/h --exact-layers 0-5
    python benchmarks/bench_attribution.py --units head --methods mean --save runs/h --exact-layers 6-13 --skip-estimate
    python benchmarks/bench_attribution.py --units head --methods mean --save runs/h --exact-layers 14-29 --skip-estimate
    python benchmarks/bench_attribution.py --report runs/h
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch

from streamlens import ablation as A
from streamlens.data import load_batch
from streamlens.model import load_model
from streamlens.results import AblationResult
from streamlens.sites import parse_numbers


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _line(kind, method, n_units, est_wall, est_cpu, wall, cpu, estimate, exact) -> str:
    agree = A.agreement(estimate, exact, "loss_increase")
    rho, r = agree.spearman, agree.pearson
    return (f"{kind:5s} {method:8s} {n_units:3d} units | estimate {est_wall:6.1f} s wall {est_cpu:6.1f} s cpu | "
            f"exact {wall:7.1f} s wall {cpu:7.1f} s cpu | speed-up wall {wall / est_wall:5.1f}x cpu "
            f"{cpu / est_cpu:5.1f}x | Spearman {rho[0]:.3f} [{rho[1]:.3f}, {rho[2]:.3f}] Pearson {r[0]:.3f} "
            f"[{r[1]:.3f}, {r[2]:.3f}] | recall top {agree.top} in top {agree.among}: {agree.recall:.2f} | "
            f"max |error| {agree.max_abs_error:.3f} nats (largest exact {float(exact.values[:, 0].abs().max()):.3f})")


def _merge(parts: list[AblationResult]) -> AblationResult:
    """Exact results of disjoint unit sets on the same batch and seed, as one result (stream order kept)."""
    import torch as t

    first = parts[0]
    tensors = {name: t.cat([getattr(p, name) for p in parts]) for name in ("values", "ci_low", "ci_high", "per_text")}
    tuples = {name: sum((tuple(getattr(p, name)) for p in parts), ()) for name in ("sites", "methods", "effects")}
    return dataclasses.replace(first, **tensors, **tuples, seconds=sum(p.seconds for p in parts))


def report(folder: Path) -> None:
    """Merge the saved parts of each (kind, method) and print the line of `main`."""
    for timing_path in sorted(folder.glob("estimate_*.json")):
        kind, method = timing_path.stem.split("_")[1:3]
        timing = json.loads(timing_path.read_text())
        estimate = AblationResult.load(folder / f"estimate_{kind}_{method}.safetensors")
        part_paths = sorted(folder.glob(f"exact_{kind}_{method}_*.json"))
        parts, wall, cpu = [], 0.0, 0.0
        for path in part_paths:
            info = json.loads(path.read_text())
            parts.append((info["first_layer"], AblationResult.load(path.with_suffix(".safetensors"))))
            wall, cpu = wall + info["wall"], cpu + info["cpu"]
        exact = _merge([result for _, result in sorted(parts, key=lambda item: item[0])])
        print(f"{len(parts)} exact parts, their wall and cpu times summed; estimate peak RSS "
              f"{timing['rss_gb']:.2f} GB ({timing['rss_growth_gb']:+.2f} GB over the loaded model)")
        print(_line(kind, method, len(exact.units), timing["wall"], timing["cpu"], wall, cpu, estimate, exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="block,attn,mlp,head", help="unit kinds, in the order run")
    parser.add_argument("--methods", default="mean,resample")
    parser.add_argument("--estimate", default="atp", choices=A.ESTIMATES)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save", default=None, help="folder: save results and timings of this part (see --report)")
    parser.add_argument("--exact-layers", default=None, help="with --save: the layers of the exact sweep, e.g. 0-5")
    parser.add_argument("--skip-estimate", action="store_true", help="with --save: only the exact part")
    parser.add_argument("--report", default=None, help="merge the parts saved in this folder and print")
    args = parser.parse_args()
    if args.report:
        report(Path(args.report))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    batch = load_batch(model, None, window=args.window, max_windows=args.max_windows)
    loaded = _rss_gb()
    print(f"{model!r}, torch threads {torch.get_num_threads()}; {batch.description}; estimate {args.estimate}; "
          f"peak RSS after loading {loaded:.2f} GB", flush=True)
    kinds, methods = args.units.split(","), args.methods.split(",")
    if args.save:
        save_part(model, batch, kinds, methods, args, Path(args.save), loaded)
        return
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
            print(_line(kind, method, len(exact.units), est_wall, est_cpu, wall, cpu, estimate, exact), flush=True)



def save_part(model, batch, kinds, methods, args, folder: Path, loaded: float) -> None:
    """One part of a split run: the estimate (unless skipped) and the exact sweep of some layers."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = None if args.exact_layers is None else list(parse_numbers(args.exact_layers, "layers", model.n_layers))
    for kind in kinds:
        for method in methods:
            if not args.skip_estimate:
                estimate, wall, cpu = _timed(lambda: A.attribute(model, batch, kind, method, estimate=args.estimate,
                                                                  command="bench"))
                estimate.save(folder / f"estimate_{kind}_{method}.safetensors")
                (folder / f"estimate_{kind}_{method}.json").write_text(json.dumps(
                    {"wall": wall, "cpu": cpu, "rss_gb": _rss_gb(), "rss_growth_gb": _rss_gb() - loaded}))
                print(f"{kind} {method} estimate {wall:.1f} s wall {cpu:.1f} s cpu", flush=True)
            exact, wall, cpu = _timed(lambda: A.sweep(model, batch, kind, method, layers=layers, command="bench"))
            name = f"exact_{kind}_{method}_{layers[0] if layers else 0:02d}"
            exact.save(folder / f"{name}.safetensors")
            (folder / f"{name}.json").write_text(json.dumps({"wall": wall, "cpu": cpu,
                                                             "first_layer": layers[0] if layers else 0}))
            print(f"{kind} {method} exact {len(exact.units)} units {wall:.1f} s wall {cpu:.1f} s cpu", flush=True)


if __name__ == "__main__":
    main()
