"""Load time of the default model: first load (GGUF -> dequantise -> safetensors cache) vs cached load.

Each load runs in a fresh process with an empty, temporary STREAMLENS_CACHE, so the first load really
converts and the later ones really read the cache.

    python benchmarks/bench_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = "import streamlens as sl; m = sl.load_model(); print(m.info.load_seconds)"
# In-process cached loads (imports already paid): the cheap size+mtime check vs --verify (full sha256).
IN_PROCESS = """import statistics, streamlens as sl
sl.load_model()
for verify in (False, True, False, True, False, True):
    print(verify, sl.load_model(verify=verify).info.load_seconds)
"""


def load_once(cache: str) -> tuple[float, float]:
    """(wall seconds of the whole process, seconds inside load_model)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, "STREAMLENS_CACHE": cache})
    return time.perf_counter() - started, float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    first, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            first.append(load_once(cache))
            cached.append(load_once(cache))
    f_load = statistics.median(x[1] for x in first)
    c_load = statistics.median(x[1] for x in cached)
    print(f"first load (GGUF conversion): load_model {f_load:.1f} s, process {statistics.median(x[0] for x in first):.1f} s")
    print(f"cached load:                  load_model {c_load:.1f} s, process {statistics.median(x[0] for x in cached):.1f} s")
    print(f"ratio first / cached load_model: {f_load / c_load:.1f}x (median of {args.repeats})")
    with tempfile.TemporaryDirectory() as cache:
        load_once(cache)
        out = subprocess.run([sys.executable, "-c", IN_PROCESS], capture_output=True, text=True, check=True,
                             env={**os.environ, "STREAMLENS_CACHE": cache}).stdout.split()
    pairs = list(zip(out[::2], map(float, out[1::2])))
    cheap = statistics.median(s for v, s in pairs if v == "False")
    full = statistics.median(s for v, s in pairs if v == "True")
    print(f"in-process cached load: cheap check {cheap:.2f} s, --verify {full:.2f} s ({full / cheap:.2f}x)")


if __name__ == "__main__":
    main()
