"""SmolLM2 with k blocks removed: judged against the full model on held-out text, timed, healed.

The pruned folder is made here with transformers (the kept blocks copied, renumbered; the export
proper is `streamlens prune`'s), from the float32 folder SmolLM2's GGUF is converted to. Held-out
text: the Python standard library's own source, split by file: `--eval-files` are judged, other
files train the heal, so the heal never sees a held-out window.

Prints: held-out loss of full and pruned with 95% CIs and the paired difference, KL, top-1
agreement, prompt accuracy, parameters, file sizes, tokens/s of both measured in one run (speed-up
against L / (L - k)), greedy generations side by side; then the heal's steps, wall and CPU seconds,
and held-out loss before/after with CIs. Writes the pruned and healed folders under --out.

    nice -n 10 python benchmarks/bench_prune_heal.py --drop 12-19 --steps 40 --out /tmp/prune-bench
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path


from streamlens.data import token_windows, window_batch
from streamlens.model import load_model
from streamlens.model.train import TrainSettings
from streamlens.prune.evaluate import EvaluateSettings, compare
from streamlens.prune.heal import heal

EVAL_FILES = ("textwrap.py", "difflib.py", "fractions.py", "calendar.py", "shlex.py", "heapq.py", "bisect.py",
              "colorsys.py")
TRAIN_FILES = ("argparse.py", "string.py", "statistics.py", "csv.py", "configparser.py", "queue.py", "enum.py",
               "dataclasses.py")


def stdlib_texts(names: tuple[str, ...]) -> list[str]:
    folder = Path(sysconfig.get_paths()["stdlib"])
    return [(folder / name).read_text(encoding="utf-8") for name in names]


def drop_blocks(source: Path, out: Path, removed: list[int]) -> Path:
    """Write `source` without the blocks `removed` to `out` (`model.export.drop_blocks`, saved atomically)."""
    from streamlens.model import export as E

    if out.exists():
        return out
    full, tokenizer = E.load_hf(source, dtype="float32")
    return E.save_folder(E.drop_blocks(full, removed), tokenizer, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", default="12-19", help="blocks to remove, a-b (inclusive)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--loss", default="distill")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the heal")
    parser.add_argument("--speed-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/prune-bench")
    parser.add_argument("--skip-compare", action="store_true", help="only heal (and its before/after)")
    parser.add_argument("--skip-heal", action="store_true", help="only compare")
    args = parser.parse_args()
    first, last = (int(v) for v in args.drop.split("-"))
    removed = list(range(first, last + 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    clock = time.perf_counter()
    full = load_model()
    print(f"[{time.perf_counter() - clock:.0f} s] loaded SmolLM2", flush=True)
    pruned_folder = drop_blocks(Path(full.info.source), out / f"smollm2-drop-{args.drop}", removed)
    pruned = load_model(str(pruned_folder))
    print(f"[{time.perf_counter() - clock:.0f} s] full: {full.n_layers} blocks; pruned: {pruned.n_layers} blocks "
          f"(removed {removed})", flush=True)
    eval_tokens = token_windows(full, stdlib_texts(EVAL_FILES), args.window, args.eval_windows)
    train_tokens = token_windows(full, stdlib_texts(TRAIN_FILES), args.window, args.train_windows)
    batch = window_batch(eval_tokens, description=f"stdlib {len(EVAL_FILES)} files ({len(eval_tokens)} windows "
                                                  f"of {args.window})")

    if not args.skip_compare:
        run_compare(full, pruned, batch, pruned_folder, out, args, clock)
    if not args.skip_heal:
        run_heal(full, pruned, batch, train_tokens, out, args, clock)


def run_compare(full, pruned, batch, pruned_folder: Path, out: Path, args: argparse.Namespace, clock: float) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    settings = EvaluateSettings(threads=args.speed_threads, repeats=args.repeats, new_tokens=24)
    comparison = compare(full, pruned, batch, settings, folders=(None, pruned_folder))
    print(f"\n[{time.perf_counter() - clock:.0f} s] compare: {time.perf_counter() - started:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU")
    table = comparison.to_dataframe()
    print(table.to_string(index=False))
    expected = full.n_layers / pruned.n_layers
    print(f"speed-up tokens/s (prefill + decode): {comparison.speedup:.3f}x; decode only "
          f"{comparison.decode_tokens_per_s[1] / comparison.decode_tokens_per_s[0]:.3f}x; "
          f"prefill only {comparison.prefill_tokens_per_s[1] / comparison.prefill_tokens_per_s[0]:.3f}x; "
          f"L / (L - k) = {expected:.3f}")
    for row in comparison.generations().itertuples():
        print(f"\nPROMPT {row.prompt!r}\n  full:   {row.full!r}\n  pruned: {row.pruned!r}")
    comparison.save(out / "comparison.safetensors")
    print(flush=True)


def run_heal(full, pruned, batch, train_tokens, out: Path, args: argparse.Namespace, clock: float) -> None:
    train_settings = TrainSettings(steps=args.steps, mode=args.mode, loss=args.loss, lr=args.lr,
                                   batch_size=args.batch_size, threads=args.threads)
    healed_folder = out / f"smollm2-drop-{args.drop}-healed-{args.mode}-{args.loss}-{args.steps}"
    healed, result = heal(pruned, train_tokens, batch, healed_folder, train_settings,
                          teacher=full, train_data=f"stdlib {len(TRAIN_FILES)} files ({len(train_tokens)} windows)")
    print(f"\n[{time.perf_counter() - clock:.0f} s] heal: {args.steps} steps {args.mode} {args.loss} lr "
          f"{train_settings.learning_rate} batch "
          f"{args.batch_size}x{args.window} on {args.threads} threads: {result.seconds:.0f} s wall, "
          f"{result.cpu_seconds:.0f} s CPU")
    print("train loss every 10 steps:", [round(float(v), 3) for v in result.train_loss[::10]])
    print(result.to_dataframe().to_string(index=False))
    result.save(out / "heal.safetensors")
    print(json.dumps({"healed_folder": str(healed_folder)}))


if __name__ == "__main__":
    main()
