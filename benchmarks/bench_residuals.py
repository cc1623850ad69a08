"""The residual family's full grid (`streamlens residuals` runs a small one): every variant on every
testbed at the depths of the claims (Transformer to 32 blocks, MLP to 100, CNN to 20 basic blocks).

    python benchmarks/bench_residuals.py --grid full --save runs/residuals-full.safetensors
    python benchmarks/bench_residuals.py --grid reduced --testbeds lm     # what fits a shared 2-core machine

Prints the verdict table, then per testbed at its deepest depth: final held-out loss, first/last
gradient ratio at init, activation memory and step time as a ratio to the pre-norm residual (the
obvious baseline), and the mean lesion damage; the CPU seconds it took. Runs on one thread, niced.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

GRIDS = {
    "full": dict(mlp_depths=(2, 8, 32, 64, 100), lm_depths=(2, 8, 16, 32), cnn_depths=(2, 6, 12, 20), steps=300,
                 eval_every=25, warmup=60),
    "reduced": dict(mlp_depths=(2, 16, 64), lm_depths=(2, 32), cnn_depths=(2, 6, 12), steps=100, eval_every=20,
                    warmup=20),
}
ALL = ("plain", "pre_norm", "post_norm", "highway", "rezero", "dense", "concat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--testbeds", default="mlp,lm,cnn")
    parser.add_argument("--seeds", default="0,1,2")
    for option in ("lm-depths", "mlp-depths", "cnn-depths", "steps", "warmup"):
        parser.add_argument(f"--{option}", default=None, help=f"override the grid's {option}, e.g. 32 or 2,8")
    parser.add_argument("--variants", default=",".join(ALL), help="variants on the MLP and the Transformer")
    parser.add_argument("--save", default=None, help="write the ResidualStudy here (.safetensors)")
    parser.add_argument("--no-lesions", action="store_true", help="skip the lesion test (a quarter of a deep lm run)")
    parser.add_argument("--eval-every", type=int, default=None, help="override the grid's eval_every")
    parser.add_argument("--workers", type=int, default=1, help="processes training runs side by side (one thread each)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from streamlens.highway.study import residual_study
    from streamlens.highway.verdicts import residual_verdicts
    from streamlens.results.residuals import ResidualConfig

    grid = dict(GRIDS[args.grid])
    for option in ("lm_depths", "mlp_depths", "cnn_depths"):
        if getattr(args, option):
            grid[option] = tuple(int(d) for d in getattr(args, option).split(","))
    for option in ("steps", "warmup"):
        if getattr(args, option):
            grid[option] = int(getattr(args, option))
    grid["eval_every"] = min(args.eval_every or grid["eval_every"], grid["steps"])
    grid["lesions"] = not args.no_lesions
    chosen = tuple(args.variants.split(","))
    config = ResidualConfig(testbeds=tuple(args.testbeds.split(",")), mlp_variants=chosen, lm_variants=chosen,
                            seeds=tuple(int(s) for s in args.seeds.split(",")), **grid)
    started, cpu = time.perf_counter(), cpu_seconds()
    study = residual_study(config, on_run=lambda run: print("done", run, flush=True), command="bench_residuals.py",
                           workers=args.workers)
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    if args.save:
        study.save(args.save)
    print(f"\n{args.grid} grid: {len(study.run_testbed)} runs, {cpu:.0f} CPU s, {wall:.0f} s wall")
    for row in residual_verdicts(study):
        print(f"{row.verdict:>8} | {row.claim} | {row.number}")
    for testbed in config.testbeds:
        for depth in config.depths(testbed):
            report(study, testbed, depth)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report(study, testbed: str, depth: int) -> None:
    """One line per variant at `depth`: means over seeds, memory and time relative to pre-norm (or residual)."""
    import torch

    baseline = study.runs(testbed, "residual" if testbed == "cnn" else "pre_norm", depth)
    ratio, params = study.first_to_last(0), study.first_to_last(0, parameters=True)
    reuse = study.reuse_loss - study.heldout_loss[:, -1]
    damage = study.lesion_damage().nanmean(-1)
    print(f"\n{testbed}, depth {depth}: variant | held-out loss | accuracy | first/last grad at init | "
          f"memory x baseline | step time x baseline | mean lesion loss increase | lesion accuracy drop | "
          f"parameter first/last grad at init | dense: weight share on non-adjacent states, loss increase without them")
    for variant in dict.fromkeys(study.run_variant[r] for r in range(len(study.run_testbed))
                                 if study.run_testbed[r] == testbed):
        runs = study.runs(testbed, variant, depth)
        if not runs:
            continue
        drop = (study.heldout_accuracy[runs, -1:] - study.lesion_accuracy[runs]).nanmean(-1)
        memory = float(study.saved_bytes[runs].mean() / study.saved_bytes[baseline].mean()) if baseline else float("nan")
        speed = float(study.step_seconds[runs].mean() / study.step_seconds[baseline].mean()) if baseline else float("nan")
        loss = study.heldout_loss[runs, -1]
        print(f"  {variant:>9} | {float(loss.mean()):.3f} ± {float(loss.std()) if len(runs) > 1 else 0:.3f} | "
              f"{float(study.heldout_accuracy[runs, -1].mean()):.3f} | {float(torch.exp(ratio[runs].log().mean())):.3g} | "
              f"x{memory:.2f} | x{speed:.2f} | {float(damage[runs].mean()):.3f} | {100 * float(drop.mean()):.1f} pts | "
              f"{float(torch.exp(params[runs].log().mean())):.3g} | "
              f"{float(study.reuse_share[runs].mean()):.3f}, {float(reuse[runs].mean()):.3f}")
        print(f"  {'':>9}   held-out loss per eval step {list(study.eval_steps)}: "
              f"{[round(v, 3) for v in study.heldout_loss[runs].mean(0).tolist()]}")


if __name__ == "__main__":
    main()
