"""Forward time of SmolLM2 with --threads default (`cli.common.default_threads`) vs 1 vs 2, with and
without a neighbour process holding one core (a busy loop), as on a shared machine.

One process loads the model once; each setting runs the same [4, 64] forward `--repeats` times,
settings interleaved so drift in the machine's load hits them alike; medians are printed with their
ratio to 1 thread.

    python benchmarks/bench_threads.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

NEIGHBOUR = "while True: pass"


def measure(model, tokens, repeats: int) -> dict[str, float]:
    from streamlens.cli.common import default_threads

    settings = {"default": None, "1": 1, "2": 2}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, threads in settings.items():
            chosen = default_threads() if threads is None else threads
            torch.set_num_threads(chosen)
            started = time.perf_counter()
            with torch.inference_mode():
                model.run(tokens)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import os

    import streamlens as sl
    from streamlens.cli.common import default_threads

    model = sl.load_model()
    tokens = torch.randint(0, model.info.d_vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    model.run(tokens)  # warm-up
    print(f"{os.cpu_count()} cores; load average now {os.getloadavg()[0]:.1f}")
    for label in ("no neighbour", "a neighbour holding one core"):
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if "holding" in label else None
        try:
            if neighbour is not None:
                time.sleep(2.0)
            print(f"{label}: default picks {default_threads()} thread(s)")
            medians = measure(model, tokens, args.repeats)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        base = medians["1"]
        for name, seconds in medians.items():
            print(f"  threads {name:>7}: {seconds * 1000:7.1f} ms  ({seconds / base:.2f}x of 1 thread)")


if __name__ == "__main__":
    main()
