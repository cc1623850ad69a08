"""The residual family's full grid (`streamlens residuals` runs a small one): every variant on every
testbed at the depths of the claims (Transformer to 32 blocks, MLP to 100, CNN to 20 basic blocks).

    python benchmarks/bench_residuals.py --grid full --save runs/residuals-full.safetensors
    python benchmarks/bench_residuals.py --grid reduced --testbeds lm     # what fits a shared 2-core machine
    python benchmarks/bench_residuals.py --tables runs/lm32-*.safetensors  # one table from saved studies

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
    parser.add_argument("--tables", nargs="+", default=None, metavar="STUDY",
                        help="print the per-variant tables of saved studies (one variant each is fine) and exit")
    parser.add_argument("--at-init", action="store_true", help="only the first/last gradient ratios at init and the "
                        "activation memory of every variant at the deepest lm depth (no training), then exit")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.at_init:
        at_init(int((args.lm_depths or "32").split(",")[-1]), args.variants.split(","),
                [int(seed) for seed in args.seeds.split(",")])
        return
    if args.tables:
        tables(args.tables)
        return
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


def at_init(depth: int, variants: list[str], seeds: list[int]) -> None:
    """Per variant and seed on the char Transformer: first/last gradient ratio at init (stream and
    parameters) on the mini-batch a training run measures at step 0, and the activation bytes; the
    same numbers as `ResidualStudy.first_to_last(0)` without training the model."""
    import torch

    from streamlens.highway.testbeds import load_testbed
    from streamlens.highway.training import (build_model, parameter_gradients, saved_activation_bytes,
                                             stream_gradients)

    torch.set_num_threads(1)
    bed = load_testbed("lm")
    for variant in variants:
        stream, params, saved = [], [], []
        for seed in seeds:
            model = build_model(bed, variant, depth, seed)
            first = torch.randint(0, len(bed.train_x), (bed.batch,), generator=torch.Generator().manual_seed(seed))
            saved.append(saved_activation_bytes(model, bed, bed.train_x[first], bed.train_y[first]))
            rows = torch.randint(0, len(bed.train_x), (bed.batch,), generator=torch.Generator().manual_seed(seed + 1))
            _, norms = stream_gradients(model, bed, bed.train_x[rows], bed.train_y[rows])
            blocks = parameter_gradients(model)
            stream.append(float(norms[0] / norms[-1])), params.append(float(blocks[0] / blocks[-1]))
        print(f"lm d{depth} {variant}: first/last grad at init {', '.join(f'{v:.3g}' for v in stream)}; parameters "
              f"{', '.join(f'{v:.3g}' for v in params)}; activation bytes {sum(saved) / len(saved) / 1e6:.2f} MB", flush=True)


def unigram_loss() -> float:
    """The char Transformer's first plateau: held-out cross-entropy of the training set's character
    frequencies (what a model that ignores the context can reach), nats."""
    import torch

    from streamlens.highway.testbeds import load_testbed

    bed = load_testbed("lm")
    counts = torch.bincount(bed.train_y.flatten(), minlength=int(bed.heldout_y.max()) + 1).double() + 1
    return float(-(counts / counts.sum()).log()[bed.heldout_y.flatten()].mean())


def tables(paths: list[str]) -> None:
    """Per testbed, depth and variant over all saved studies: final held-out loss with its 95% t interval
    over seeds, accuracy, first/last gradient ratios at init (stream and parameters) per seed, the first
    eval step past the unigram plateau (lm), activation memory relative to pre-norm, dense reuse."""
    import torch

    from streamlens.highway.verdicts import seed_interval
    from streamlens.results.residuals import ResidualStudy

    studies = [ResidualStudy.load(path) for path in paths]
    plateau = unigram_loss() if any("lm" in study.testbeds for study in studies) else float("nan")
    print(f"unigram plateau (lm held-out loss of the training character frequencies): {plateau:.3f} nats")
    groups: dict[tuple, list] = {}
    for study, r in ((s, r) for s in studies for r in range(len(s.run_testbed))):
        key = (study.run_testbed[r], study.run_depth[r], study.run_variant[r], study.run_warmup[r])
        groups.setdefault(key, []).append((study, r))
    memory = {key: sum(float(s.saved_bytes[r]) for s, r in runs) / len(runs) for key, runs in groups.items()}
    for (testbed, depth, variant, warmup), runs in sorted(groups.items()):
        study = runs[0][0]
        rows = [r for _, r in runs]
        loss = torch.cat([s.heldout_loss[r, -1:] for s, r in runs])
        mean, low, high = seed_interval(loss)
        curve = torch.stack([s.heldout_loss[r] for s, r in runs]).mean(0)
        past = [step for step, value in zip(study.eval_steps, curve.tolist()) if value < plateau - 0.1]
        ratio = [float(s.first_to_last(0)[r]) for s, r in runs]
        params = [float(s.first_to_last(0, parameters=True)[r]) for s, r in runs]
        base = memory.get((testbed, depth, "residual" if testbed == "cnn" else "pre_norm", 0), float("nan"))
        accuracy = sum(float(s.heldout_accuracy[r, -1]) for s, r in runs) / len(runs)
        reuse = ([float(s.reuse_share[r]) for s, r in runs], [float(s.reuse_loss[r] - s.heldout_loss[r, -1]) for s, r in runs])
        print(f"{testbed} d{depth} {variant}{f'+warmup{warmup}' if warmup else ''} ({len(rows)} seeds, "
              f"{study.steps} steps): held-out loss {mean:.3f} [{low:.3f}, {high:.3f}], accuracy {accuracy:.3f}; "
              f"first/last grad at init {', '.join(f'{v:.3g}' for v in ratio)}; parameters "
              f"{', '.join(f'{v:.3g}' for v in params)}; memory x{memory[testbed, depth, variant, warmup] / base:.2f}"
              + (f"; past the plateau from step {past[0]}" if testbed == "lm" and past else
                 "; never past the plateau" if testbed == "lm" else "")
              + (f"; reuse share {', '.join(f'{v:.3f}' for v in reuse[0])}, loss without it "
                 f"+{', '.join(f'{v:.3f}' for v in reuse[1])}" if variant == "dense" else ""))
        print(f"    held-out loss at steps {list(study.eval_steps)}: {[round(v, 3) for v in curve.tolist()]}")


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
