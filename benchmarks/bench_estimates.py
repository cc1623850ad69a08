"""The cost/accuracy frontier of the estimators on SmolLM2: process CPU seconds against Spearman,
Pearson (95% bootstrap CIs over texts) and recall of the exact top 10, per unit kind, method,
estimator and number of steps, with the exact sweep computed ONCE per (kind, method) and saved.

    python benchmarks/bench_estimates.py exact --save runs/est           # the exact sweeps (slow, once)
    python benchmarks/bench_estimates.py frontier --save runs/est        # every estimate, timed, saved
    python benchmarks/bench_estimates.py table --save runs/est            # the Markdown table (+ figure)
    python benchmarks/bench_estimates.py topk --save runs/est --top 10   # --exact-top on the heads
    python benchmarks/bench_estimates.py replay --save runs/est --top 10  # the stop rule on the saved sweeps
    python benchmarks/bench_estimates.py ceiling --save runs/est          # how reproducible the exact sweep is
    python benchmarks/bench_estimates.py memory --save runs/est --window 64 --max-windows 16 --steps 1 --batch-size 16

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


def configs(args) -> list[tuple[str, int, int]]:
    """(estimator, steps, depth) of the frontier: ig at each N (N = 1 is AtP), the second-order term
    and the further estimators named by `--also` (e.g. atp-qk,atpstar,local-0,local-1)."""
    out = [("ig", steps, 0) for steps in (int(n) for n in args.steps.split(",") if n)]
    out += [("second-order", 1, 0)] if args.second_order else []
    for name in filter(None, args.also.split(",")):
        out.append(("local", 1, int(name.split("-")[1])) if name.startswith("local-") else (name, 1, 0))
    return out


def frontier(args, folder: Path) -> None:
    """Every estimate of every (kind, method), timed in CPU seconds and saved; skipped when saved."""
    model, batch = setup(args)
    loaded = peak_rss_gb()
    for kind in args.units.split(","):
        for method in args.methods.split(","):
            for estimate, steps, depth in configs(args):
                label = A.method_label(estimate, steps, depth)
                path = folder / f"estimate_{kind}_{method}_{label}.safetensors"
                if path.exists():
                    continue
                result, wall, cpu = timed(lambda: A.attribute(model, batch, kind, method, estimate=estimate,
                                                              steps=steps, depth=depth, batch_size=args.batch_size,
                                                              command="bench_estimates frontier"))
                result.save(path)
                path.with_suffix(".json").write_text(json.dumps({"wall": wall, "cpu": cpu, "rss_gb": peak_rss_gb(),
                                                                 "loaded_gb": loaded}))
                print(f"{kind} {method} {label}: {cpu:.1f} s cpu ({wall:.1f} s wall); peak RSS {peak_rss_gb():.2f} GB",
                      flush=True)


def rows(folder: Path, top: int) -> list[dict]:
    """One row per saved estimate that has its exact sweep: cost and agreement (loss increase)."""
    out = []
    for path in sorted(folder.glob("estimate_*.safetensors")):
        kind, method, label = path.stem.split("_")[1:4]
        exact_path = folder / f"exact_{kind}_{method}.safetensors"
        if not exact_path.exists():
            continue
        estimate, exact = AblationResult.load(path), AblationResult.load(exact_path)
        cost = json.loads(path.with_suffix(".json").read_text())["cpu"]
        exact_cost = json.loads(exact_path.with_suffix(".json").read_text())["cpu"]
        agree = A.agreement(estimate, exact, "loss_increase", top=top, among=top)
        bar = None if estimate.error_bar is None else float(estimate.error_bar[:, 0].median())
        out.append({"kind": kind, "method": method, "estimate": label, "units": agree.n_units, "cpu": cost,
                    "exact_cpu": exact_cost, "spearman": agree.spearman, "pearson": agree.pearson,
                    "recall": agree.recall, "max_error": agree.max_abs_error, "median_error_bar": bar})
    return out


def table(args, folder: Path) -> None:
    """The Markdown table of the frontier (and the figure, frontier.html, next to the results)."""
    found = rows(folder, args.top)
    print(f"| unit | method | estimate | CPU s | exact CPU s | speed-up | Spearman [95% CI] | Pearson [95% CI] | "
          f"recall top {args.top} | max error | median error bar |")
    print("|---|---|---|---:|---:|---:|---|---|---:|---:|---:|")
    for row in found:
        rho, r = row["spearman"], row["pearson"]
        bar = "-" if row["median_error_bar"] is None else f"{row['median_error_bar']:.4f}"
        print(f"| {row['kind']} | {row['method']} | {row['estimate']} | {row['cpu']:.1f} | {row['exact_cpu']:.1f} | "
              f"{row['exact_cpu'] / row['cpu']:.1f}x | {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}] | "
              f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}] | {row['recall']:.1f} | {row['max_error']:.3f} | {bar} |")
    from streamlens.plots.attribution import frontier as figure

    (folder / "frontier.json").write_text(json.dumps(found, indent=1))
    figure(found).write_html(folder / "frontier.html", include_plotlyjs="cdn")


def topk(args, folder: Path) -> None:
    """`exact_top` on the saved estimate of each (kind, method): evaluations against the full sweep,
    and whether its top K is the full sweep's."""
    model, batch = setup(args)
    for kind in args.units.split(","):
        for method in args.methods.split(","):
            estimate = AblationResult.load(folder / f"estimate_{kind}_{method}_{args.topk_estimate}.safetensors")
            exact = AblationResult.load(folder / f"exact_{kind}_{method}.safetensors")
            run, wall, cpu = timed(lambda: A.exact_top(model, batch, estimate, args.top, alpha=args.alpha,
                                                       command="bench topk"))
            truth = [exact.units[i] for i in A.by_damage(exact, "loss_increase")[::-1][: args.top]]
            print(f"{kind} {method} exact top {args.top} from {args.topk_estimate}: {run.evaluations} of {run.n_units} "
                  f"exact evaluations ({run.evaluations / run.n_units:.2f}), settled {run.settled}, q "
                  f"{run.quantile:.4f}; same set as the full sweep: {set(run.top) == set(truth)}, same order: "
                  f"{list(run.top) == truth}; {cpu:.1f} s cpu (exact sweep "
                  f"{json.loads((folder / f'exact_{kind}_{method}.json').read_text())['cpu']:.1f} s)", flush=True)


def replay(args, folder: Path) -> None:
    """`exact_top`'s rule replayed on the saved exact sweeps (no model: measuring a unit = reading its
    exact value, which the engine reproduces to 1e-12), over `--draws` calibration draws: the exact
    evaluations (median, max) and how many draws return the sweep's top K (set and order). With
    `--first-layers L` the units of layers < L are measured too (a stratum outside the error model)."""
    from streamlens.ablation.attribute.topk import calibration_rows, min_calibration, settle

    print(f"| unit | method | estimate | first layers exact | evaluations (median, max of {args.draws} draws) "
          f"| of | top {args.top} = sweep's |")
    print("|---|---|---|---:|---|---:|---:|")
    for path in sorted(folder.glob("estimate_*.safetensors")):
        kind, method, label = path.stem.split("_")[1:4]
        exact_path = folder / f"exact_{kind}_{method}.safetensors"
        if not exact_path.exists() or kind not in args.units.split(","):
            continue
        estimate, exact = AblationResult.load(path), AblationResult.load(exact_path)
        truth_damage = exact.values[[exact.units.index(u) for u in estimate.units], 0]  # loss increase: damage
        truth = torch.argsort(truth_damage, descending=True)[: args.top].tolist()
        always = [row for row, unit in enumerate(estimate.sites) if unit[0].layer < args.first_layers]
        counts, right = [], 0
        for draw in range(args.draws):
            pool = len(estimate.units) - args.top - len(always)
            estimated = estimate.values[:, 0]
            drawn = calibration_rows(estimated, args.top, min(min_calibration(args.alpha), pool), draw, always)
            found = settle(estimated, lambda rows: [float(truth_damage[r]) for r in rows], args.top, drawn,
                           args.alpha, always)
            counts.append(len(found.damage))
            right += found.top(args.top) == truth
        counts.sort()
        print(f"| {kind} | {method} | {label} | {args.first_layers} | {counts[len(counts) // 2]}, {counts[-1]} "
              f"| {len(estimate.units)} | {right} of {args.draws} |")


def ceiling(args, folder: Path) -> None:
    """How far the exact sweep itself is reproducible, to read the Spearman goal against: per (kind,
    method), the Spearman of the exact effects on the even texts against the odd texts (split half),
    the units whose exact 95% CI excludes 0 (resolved), and each estimate's Spearman over those only."""
    from streamlens import stats

    print("| unit | method | exact split-half Spearman | resolved units | Spearman over the resolved units |")
    print("|---|---|---:|---:|---|")
    for exact_path in sorted(folder.glob("exact_*.safetensors")):
        kind, method = exact_path.stem.split("_")[1:3]
        exact = AblationResult.load(exact_path)
        per_text = exact.per_text[:, 0]
        halves = stats.ranks(per_text[:, 0::2].mean(-1)), stats.ranks(per_text[:, 1::2].mean(-1))
        split = float(torch.corrcoef(torch.stack(halves))[0, 1])
        resolved = [row for row in range(len(exact.units)) if exact.ci_low[row, 0] > 0 or exact.ci_high[row, 0] < 0]
        cells = []
        for path in sorted(folder.glob(f"estimate_{kind}_{method}_*.safetensors")):
            estimate = AblationResult.load(path)
            guess = estimate.values[[estimate.units.index(exact.units[row]) for row in resolved], 0]
            truth = exact.values[resolved, 0]
            rho = float(torch.corrcoef(torch.stack([stats.ranks(guess), stats.ranks(truth)]))[0, 1])
            cells.append(f"{path.stem.split('_')[3]} {rho:.2f}")
        print(f"| {kind} | {method} | {split:.2f} | {len(resolved)} of {len(exact.units)} | {'; '.join(cells)} |")


def memory(args, folder: Path) -> None:
    """Peak RSS of one estimate (heads, mean) over the loaded model, texts `--batch-size` at a time; run
    once per batch size, each in a fresh process (the peak is per process)."""
    model, batch = setup(args)
    loaded = peak_rss_gb()
    estimate, steps = ("ig", int(args.steps.split(",")[0]))
    _, wall, cpu = timed(lambda: A.attribute(model, batch, "head", "mean", estimate=estimate, steps=steps,
                                             batch_size=args.batch_size, command="bench_estimates memory"))
    print(f"memory: {batch.description}, batch_size {args.batch_size}, ig-{steps}: peak RSS {peak_rss_gb():.2f} GB "
          f"(loaded model {loaded:.2f} GB, +{peak_rss_gb() - loaded:.2f} GB); {cpu:.1f} s cpu", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("exact", "frontier", "table", "topk", "replay", "ceiling", "memory"))
    parser.add_argument("--save", required=True, help="folder of the saved results")
    parser.add_argument("--units", default="head,block,attn,mlp")
    parser.add_argument("--methods", default="mean,resample")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="ig step counts")
    parser.add_argument("--second-order", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--also", default="", help="further estimators, comma-separated (atp-qk, atpstar, local-D)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per gradient forward")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--topk-estimate", default="ig-4", help="the saved estimate exact_top starts from")
    parser.add_argument("--alpha", type=float, default=0.05, help="exact_top: the conformal miscoverage")
    parser.add_argument("--draws", type=int, default=20, help="replay: calibration draws (seeds 0..draws-1)")
    parser.add_argument("--first-layers", type=int, default=0, help="replay: measure layers below this too")
    args = parser.parse_args()
    folder = Path(args.save)
    folder.mkdir(parents=True, exist_ok=True)
    {"exact": exact, "frontier": frontier, "table": table, "topk": topk, "replay": replay, "ceiling": ceiling,
     "memory": memory}[args.stage](args, folder)


if __name__ == "__main__":
    main()
