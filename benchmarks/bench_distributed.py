"""One ablation sweep in process vs on 1 and 2 Ray workers (this machine), and Ray's fixed start-up cost.

in-process:  streamlens.ablation.sweep in this process (torch threads 1, then 2: the machine's cores).
ray xN:      the same sweep with backend=RayBackend(workers=N) on a local cluster (1 thread per worker),
             timed warm: the cluster is up and each worker has loaded the model.
start-up:    starting the local cluster (ray.init), starting N workers (a process each that imports
             torch and streamlens and loads the model), and the first sweep's extra time over a warm one.

Warm runs are interleaved over --repeats rounds (rotating who goes first, so a busy spell on a shared
machine hits all); medians of wall time, ratios to in-process with 1 thread. Also: the largest
difference of any per-text value between Ray and in-process, and the measured cost of one ablated
forward (seconds and achieved GFLOP/s, FLOPs counted as in README "Sweeps on many machines").

    python benchmarks/bench_distributed.py                         # SmolLM2 block sweep, 8 x 32 tokens
    python benchmarks/bench_distributed.py --windows 16 --window 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamlens import ablation as A
from streamlens.data import load_batch
from streamlens.model import load_model


def forward_flops(info, d_mlp: int, n_kv_heads: int, layers: float, n_positions: int, n_scored: int) -> float:
    """FLOPs of one text's ablated forward through `layers` blocks (Llama-style: q, k, v, o projections,
    causal attention over n_positions / 2 keys on average, a gated MLP) and the unembedding of its
    scored positions. 2 FLOPs per multiply-add."""
    d, heads, d_head = info.d_model, info.n_heads, info.d_head
    projections = 2 * d * heads * d_head * 2 + 2 * d * n_kv_heads * d_head * 2
    attention = 2 * 2 * heads * d_head * (n_positions / 2)
    mlp = 3 * 2 * d * d_mlp
    return layers * n_positions * (projections + attention + mlp) + n_scored * 2 * d * info.d_vocab


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--unit", default="block")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="in-process torch threads to time (2 threads crawl when "
                        "another process holds a core: use 1 on a busy shared machine)")
    args = parser.parse_args()

    import ray

    torch.set_num_threads(1)
    model = load_model(args.model)
    batch = load_batch(model, None, window=args.window, max_windows=args.windows)
    options = A.EvalOptions(batch_size=args.windows, n_boot=200)
    sweep = lambda **kw: A.sweep(model, batch, args.unit, "zero", "total", options=options, **kw)  # noqa: E731
    print(f"{model.info.name}: {args.unit} sweep, zero, total effect, {batch.n_texts} windows x {args.window} tokens",
          flush=True)

    # 4 logical CPUs on the 2 cores: the 1-worker and the 2-worker sets stay up together (idle ones use no CPU)
    cluster = timed(lambda: ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                                      _system_config={"worker_niceness": 0}))  # as RayBackend's local cluster
    backends, start = {}, {}
    for workers in (1, 2):
        backends[workers] = A.RayBackend(workers=workers)
        start[workers] = timed(lambda: backends[workers].start(model))
    first = {workers: timed(lambda: sweep(backend=backends[workers])) for workers in (1, 2)}
    print(f"cluster {cluster:.1f} s, workers {start}, first sweeps {first}", flush=True)

    runs = {f"in-process, {n} thread{'s' if n > 1 else ''}": lambda n=n: A.sweep(
        model, batch, args.unit, "zero", "total", options=A.EvalOptions.of(options, threads=n))
        for n in sorted({1, *(int(item) for item in args.threads.split(","))})}
    runs |= {"ray, 1 worker": lambda: sweep(backend=backends[1]), "ray, 2 workers": lambda: sweep(backend=backends[2])}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.repeats):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            seconds[name].append(timed(runs[name]))
            print(f"  round {round_index + 1}: {name} {seconds[name][-1]:.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    base = median["in-process, 1 thread"]
    print(f"\nwarm sweep, median of {args.repeats} (wall s; time ratio to in-process 1 thread; speed-up):")
    for name in names:
        print(f"  {name:22s} {median[name]:7.2f} s   x{median[name] / base:5.2f}   speed-up {base / median[name]:4.2f}")

    reference = A.sweep(model, batch, args.unit, "zero", "total", options=options)
    difference = max(float((sweep(backend=backends[w]).per_text - reference.per_text).abs().max()) for w in (1, 2))
    print(f"\nlargest per-text difference, ray vs in-process: {difference:.1e}")
    print("\nRay fixed start-up overhead:")
    print(f"  start the local cluster (ray.init)        {cluster:6.1f} s")
    for workers in (1, 2):
        warm = median[f"ray, {workers} worker{'s' if workers > 1 else ''}"]
        print(f"  start {workers} worker(s) (spawn, import, load)  {start[workers]:6.1f} s; first sweep "
              f"+{first[workers] - warm:.1f} s over a warm one")
    total = {w: cluster + start[w] + first[w] for w in (1, 2)}
    print(f"  end to end, cluster + workers + one sweep: 1 worker {total[1]:.1f} s (x{total[1] / base:.1f} of "
          f"in-process), 2 workers {total[2]:.1f} s (x{total[2] / base:.1f})")

    units = A.units(model, args.unit)
    layers = sum(model.n_layers - (site.layer + 1 if args.unit == "block" else site.layer) for site in units)
    config = model._bridge.cfg
    d_mlp = int(getattr(config, "d_mlp", None) or 4 * model.info.d_model)
    n_kv = int(getattr(config, "n_key_value_heads", None) or model.info.n_heads)
    per_text = [forward_flops(model.info, d_mlp, n_kv, layers / len(units), args.window, batch.n_scored // batch.n_texts)]
    flops = per_text[0] * len(units) * batch.n_texts
    per_forward = base / (len(units) * batch.n_texts)
    print(f"\nmeasured cost of one ablated forward of one {args.window}-token text (in-process, 1 thread): "
          f"{per_forward * 1e3:.1f} ms, {per_text[0] / 1e9:.2f} GFLOP: {flops / base / 1e9:.1f} GFLOP/s achieved")
    for backend in backends.values():
        backend.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
