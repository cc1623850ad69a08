"""Every pruning strategy on SmolLM2, chosen on one set of texts and judged on another.

Chooses with each strategy (measured greedy removal, Block Influence, the angular-distance span, the
last blocks before the final one, attention-only and MLP-only) on --choice-windows windows of the
built-in texts, then measures held-out loss for k = 1 .. --k-max on --eval-windows windows of the
Python standard library's source (disjoint, checked by hashing). Prints, for the k of --report, each
strategy's held-out loss with its 95% CI, the winner, and greedy's paired gap to each cheap score;
writes the comparison (safetensors) and a JSON summary into --out. Process CPU seconds per step.

    python benchmarks/bench_prune.py                                  # 16 + 32 windows of 64, k <= 8
    python benchmarks/bench_prune.py --choice-windows 8 --eval-windows 16 --k-max 4 --report 2,4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from streamlens import data as D
from streamlens.ablation import EvalOptions
from streamlens.model import load_model
from streamlens.prune import choose, compare, verdicts
from streamlens.results.prune import LABELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--eval-data", default="stdlib")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--choice-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--report", default="2,4,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="streamlens-out/bench-prune")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    choice_batch = D.corpus_batch(model, args.data, args.window, args.choice_windows)
    held_out = D.corpus_batch(model, args.eval_data, args.window, args.eval_windows)
    D.check_disjoint(choice_batch, held_out)
    options = EvalOptions(batch_size=16, n_boot=1000)
    cpu = time.process_time()
    choice = choose(model, choice_batch, args.k_max, options, command="bench_prune")
    cpu_choose = time.process_time() - cpu
    cpu = time.process_time()
    comparison = compare(model, held_out, choice, options, command="bench_prune")
    cpu_compare = time.process_time() - cpu
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparison.save(out / "comparison.safetensors")
    choice.save(out / "choice.safetensors")
    clean = comparison.clean_interval.tolist()
    print(f"{model.info.name}: choice {choice_batch.description}; held out {held_out.description}")
    print(f"clean held-out loss {clean[0]:.3f} [{clean[1]:.3f}, {clean[2]:.3f}]; CPU s: choose {cpu_choose:.0f}, "
          f"compare {cpu_compare:.0f}")
    report = {}
    for k in (int(v) for v in args.report.split(",")):
        if k > comparison.k_max:
            continue
        print(f"\nk = {k}")
        for name in comparison.strategies:
            value, low, high = comparison.summary(name, k)
            gap = comparison.paired(name, k)
            print(f"  {LABELS[name]:<40} {value:.3f} [{low:.3f}, {high:.3f}]  blocks {choice.removed(name, k)}  "
                  f"greedy - this {gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}]")
        print(f"  lowest (blocks): {comparison.best(k)}; lowest (any unit): "
              f"{comparison.best(k, ('block', 'attn', 'mlp'))}")
        report[k] = {name: {"loss": comparison.summary(name, k), "greedy_minus_this": comparison.paired(name, k),
                            "layers": choice.removed(name, k)} for name in comparison.strategies}
        report[k]["best_blocks"] = comparison.best(k)
    rows = verdicts(comparison, max(k for k in report) if report else None)
    for row in rows:
        print(f"- {row.claim}: {row.number} -> {row.verdict}")
    summary = {"clean": clean, "by_k": report, "cpu_seconds": {"choose": cpu_choose, "compare": cpu_compare},
               "choice": choice_batch.description, "held_out": held_out.description,
               "verdicts": [row.__dict__ for row in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
