"""Peak memory of `record` vs transformer-lens `run_with_cache` on the same input.

Each method runs in its own fresh process: load the model, run one plain forward (warms the allocator),
reset the kernel's peak-RSS counter (/proc/self/clear_refs), run the method, keep its output alive,
and read the peak (VmHWM). Reported: peak RSS above the warmed baseline, and bytes of tensors kept.

    python benchmarks/bench_record_memory.py [--tokens 256] [--model smollm2] [--repeats 3]

record keeps what it is asked for: with heads=True it also keeps each head's z [layers, batch, pos,
heads, d_head] (the size of the attention writes) and references to the model's W_O; per-head writes
[.., heads, d_model] are computed on demand, one layer at a time. Both are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(method: str, model_name: str, n_tokens: int) -> dict:
    import gc

    import torch

    from streamlens.model import load_model
    from streamlens.recording import record

    torch.set_grad_enabled(False)
    model = load_model(model_name)
    tokens = torch.randint(0, model.info.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    model.run(tokens)
    gc.collect()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM (peak RSS) to the current RSS
    if method.startswith("record"):
        kept = record(model, tokens, heads=method == "record+heads")
        tensors = [kept.embed, kept.attn, kept.mlp, kept.z, kept.attn_post_scale, kept.final, kept.final_scale,
                   kept.logits]
    else:
        logits, cache = model.run_with_cache(tokens)
        kept = (logits, cache)
        tensors = [logits, *cache.values()]
    peak = _status_kib("VmHWM")
    held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return {"method": method, "peak_above_baseline_mib": (peak - baseline) / 1024, "held_mib": held / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["record", "record+heads", "cache"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.tokens)))
        return
    runs: dict[str, list[dict]] = {"record": [], "record+heads": [], "cache": []}
    for _ in range(args.repeats):
        for method in runs:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--tokens", str(args.tokens),
                                  "--model", args.model], capture_output=True, text=True, check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for method, results in runs.items():
        peak = statistics.median(r["peak_above_baseline_mib"] for r in results)
        held = statistics.median(r["held_mib"] for r in results)
        summary[method] = (peak, held)
        print(f"{method:>12}: peak RSS above baseline {peak:8.1f} MiB (median of {len(results)}), tensors kept {held:8.1f} MiB")
    for method in ("record", "record+heads"):
        print(f"ratio run_with_cache / {method}: peak {summary['cache'][0] / summary[method][0]:.1f}x, "
              f"kept {summary['cache'][1] / summary[method][1]:.1f}x  ({args.tokens} tokens, model {args.model})")


if __name__ == "__main__":
    main()
