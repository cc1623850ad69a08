"""Cost of the default integrity check on a cached SmolLM2 load (issue 19): this tree vs an older one.

Before, a cached load trusted every file whose size and mtime were unchanged; now it reads every file
and checks its XXH3-128 checksum (and refuses an encoder with one extra probe forward). Both trees
load from the same cache, in alternating fresh processes; each process loads once to warm up (the
first load of this tree also upgrades an older manifest), then `--loads` times, timed in CPU seconds
(`time.process_time`) and wall seconds. Also times the checksum of model.safetensors alone.

    python benchmarks/bench_integrity.py --before /path/to/old/checkout [--rounds 3 --loads 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """import json, sys, time, streamlens as sl
sl.load_model()
cpu, wall = [], []
for _ in range(int(sys.argv[1])):
    c, w = time.process_time(), time.perf_counter()
    sl.load_model()
    cpu.append(time.process_time() - c); wall.append(time.perf_counter() - w)
print(json.dumps({"cpu": cpu, "wall": wall}))
"""


def loads(tree: str, n: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of streamlens before the change")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", type=int, default=3)
    args = parser.parse_args()
    after = str(Path(__file__).resolve().parents[1])
    times: dict[str, dict[str, list[float]]] = {"before": {"cpu": [], "wall": []}, "after": {"cpu": [], "wall": []}}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", after)):
            for key, values in loads(tree, args.loads).items():
                times[name][key] += values
    for name in times:
        print(f"{name:>6}: cached load_model median {statistics.median(times[name]['cpu']):.2f} CPU s, "
              f"{statistics.median(times[name]['wall']):.2f} wall s ({len(times[name]['cpu'])} loads)")
    ratio = statistics.median(times["after"]["cpu"]) / statistics.median(times["before"]["cpu"])
    print(f"after / before (CPU): {ratio:.2f}x")
    sys.path.insert(0, after)
    import time

    import streamlens as sl
    from streamlens.model import cache

    folder = Path(sl.load_model().info.source)
    weights = folder / "model.safetensors"
    for name, function in (("xxh3_128 (default)", cache.quick_hash), ("sha256 (--verify)", cache.file_hash)):
        started = time.process_time()
        function(weights)
        print(f"{name} of model.safetensors ({weights.stat().st_size / 1e6:.0f} MB): "
              f"{time.process_time() - started:.2f} CPU s")


if __name__ == "__main__":
    main()
