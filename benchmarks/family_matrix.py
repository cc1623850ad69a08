"""The family matrix: `streamlens check` on a tiny random model of every family, as a markdown table.

For each family of `streamlens.testing.FAMILIES` (float64; float32 for `--float32` families): the
errors of `streamlens.exactness.check_model`, plus the decomposition against the logits of the HF
model as shipped (an independent load; HF rounds its norms and attention softmax through float32, so
this one is ~1e-8 even in float64). The README's "Supported architectures" table is this output.

    python benchmarks/family_matrix.py [--families llama,gemma2] [--float32 llama,gemma2,gpt_neox]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def hf_decomposition_error(model, folder, dtype: str) -> float:
    """|decomposition total - HF-as-shipped logits| / logit scale, all positions, top-2 targets."""
    from transformers import AutoModelForCausalLM

    from streamlens.decomposition import decompose

    tokens = torch.randint(0, model.info.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    parts = decompose(model, tokens, positions=range(12), top_k=2, by_head=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        expected = hf(tokens).logits[0].gather(-1, parts.target_ids)
    return float((parts.total - expected.double()).abs().max() / parts.logits.abs().max())


def main() -> None:
    from streamlens.exactness import check_model
    from streamlens.model import load_model
    from streamlens.testing import FAMILIES, tiny_model_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--float32", default="llama,gemma2,gpt_neox")
    args = parser.parse_args()
    runs = [(f, "float64") for f in args.families.split(",")] + [(f, "float32") for f in args.float32.split(",") if f]
    print("| family | dtype | norm | identity | decomposition | decomposition vs HF as shipped | head sum | "
          "ablation vs hooks (nats) | bridge vs HF | read-out | load s | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for family, dtype in runs:
        with tempfile.TemporaryDirectory() as folder:
            tiny_model_folder(folder, arch=family)
            model = load_model(folder, dtype=dtype)
            result = check_model(model)
            vs_hf = hf_decomposition_error(model, folder, dtype)
        e = result.error
        print(f"| {family} | {dtype} | {result.norm_kind} | {e('identity'):.1e} | {e('decomposition'):.1e} | "
              f"{vs_hf:.1e} | {e('head sum'):.1e} | {e('ablation'):.1e} | {e('bridge vs HF'):.1e} | "
              f"{e('read-out'):.1e} | {result.load_seconds:.1f} | {'yes' if result.passed else 'NO'} |", flush=True)
    print(f"\n{len(runs)} models in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
