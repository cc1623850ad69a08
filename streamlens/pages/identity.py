"""The files and pages of `streamlens identity` and `streamlens lens train|eval`, composed from results only."""

from __future__ import annotations

import html
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from streamlens.pages.html import Report, Section
from streamlens.plots import identity as plots
from streamlens.results.identity import TokenIdentity
from streamlens.results.sources import AttentionSources
from streamlens.results.tunedlens import LensComparison, TunedLens

HEADLINE_STAGES = (0, 6, 16, 26)  # embeddings and after blocks 5, 15, 25 (clipped to the model), plus the last


def _stages(n_stages: int) -> list[int]:
    return sorted({stage for stage in HEADLINE_STAGES if stage < n_stages} | {n_stages - 1})


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def identity_summary(identity: TokenIdentity) -> dict[str, Any]:
    """Probe top-1/top-5 and the majority baseline at the headline stages, clean and with skips removed."""
    out: dict[str, Any] = {"text": identity.text, "alpha": identity.alpha,
                           "n_scored_tokens": {t: identity.n_tokens[i].tolist() for i, t in enumerate(identity.targets)}}
    last = len(identity.layer_labels) - 1
    for target in identity.targets:
        rows = {}
        for stage in _stages(len(identity.layer_labels)):
            name = "embed" if stage == 0 else f"after block {stage - 1}"
            rows[name] = {m: _number(float(identity.get(m, target)[stage])) for m in identity.measures}
        for c, layer in enumerate(identity.removed):
            if layer >= 0:
                for stage, name in ((layer + 1, f"after block {layer}, its skip removed"),
                                    (last, f"final stream, skip around {layer} removed")):
                    rows[name] = {m: _number(float(identity.get(m, target, condition=identity.conditions[c])[stage]))
                                  for m in identity.measures}
        out[target] = rows
    return out


def identity_sections(identity: TokenIdentity) -> list[Section]:
    what = f"held-out texts of {html.escape(identity.text)} (leave one text out), 95% bootstrap bands over texts"
    return [
        Section("Token identity: a linear probe for the current and previous token", (
            f"Top-1 accuracy of a ridge probe (penalty {identity.alpha} per token) fitted on the other texts, "
            f"over tokens seen in training; dotted: always guessing the most frequent training token. {what}."),
            plots.identity_curves(identity, "probe_top1")),
        Section("Token identity: reading the stream through the embedding matrix", (
            "log10(1 + rank) of the token when the stream after the final norm is multiplied by the embedding "
            "matrix (0 = the token itself comes first)."), plots.identity_curves(identity, "log10_rank")),
        Section("Token identity: cosine with the token's embedding", (
            "Cosine between the stream and the token's own embedding row."), plots.identity_curves(identity, "cosine")),
        Section("Word starts vs continuations", (
            "The current-token probe for tokens that start a word and for tokens glued to the one before."),
            plots.identity_splits(identity)),
        Section("Removing the skip around one block", (
            "With the skip around block L removed the stream after L is the block's writes alone; the probe is "
            "refitted on that stream, and on the final stream of the altered model."), plots.skip_removed(identity)),
    ]


def sources_summary(sources: AttentionSources) -> dict[str, Any]:
    return {
        "position": sources.position, "token": sources.token_strings[sources.position], "target": sources.target_string,
        "logit": sources.logit, "split_error": sources.error,
        "top_sources": [{"position": src, "token": sources.token_strings[src], "contribution": value,
                         "top_heads": [{"head": site.label, "contribution": part} for site, part in heads]}
                        for src, value, heads in sources.top_sources(3)],
        "top_head_source_pairs": [{"head": site.label, "position": src, "token": sources.token_strings[src],
                                   "contribution": value} for site, src, value in sources.top(5)],
        "same_position_share_per_layer": sources.same_share().tolist(),
    }


def sources_sections(sources: AttentionSources) -> list[Section]:
    return [
        Section("Where attention reads from: heads x source tokens", (
            f"The direct contribution of each head to the logit of {html.escape(repr(sources.target_string))} at "
            f"{html.escape(repr(sources.token_strings[sources.position]))}, split by the source position it read "
            "(attention pattern and final-norm scale frozen at their clean values, so the parts sum exactly to the "
            f"head's contribution: largest gap {sources.error:.2g})."), plots.source_heatmap(sources)),
        Section("Same position vs other positions, next to the MLP", (
            "Per layer, the mean norm over positions of the attention write coming from the position itself and "
            "from all other positions, and of the MLP write, which reads only its own position. Red line: the "
            "same-position share ||same|| / (||same|| + ||other||)."), plots.source_norms(sources)),
    ]


def identity_files(identity: TokenIdentity, sources: AttentionSources | None, command: str,
                   seconds: float) -> dict[str, str]:
    """identity.csv (+ identity_sources.csv), identity.json, identity.html."""
    summary = {"command": command, "seconds": seconds, "model": identity.provenance.model,
               "weights_hash": identity.provenance.weights_hash, "versions": identity.provenance.versions,
               "seed": identity.provenance.seed, "identity": identity_summary(identity)}
    files = {"identity.csv": identity.to_dataframe().to_csv(index=False)}
    sections = identity_sections(identity)
    if sources is not None:
        summary["sources"] = sources_summary(sources)
        files["identity_sources.csv"] = sources.to_dataframe().to_csv(index=False)
        sections += sources_sections(sources)
    facts = (("model", identity.provenance.model), ("text", identity.text), ("command", command),
             ("seconds", f"{seconds:.1f}"))
    files["identity.json"] = json.dumps(summary, indent=2) + "\n"
    files["identity.html"] = Report("streamlens identity: what the stream carries", facts, tuple(sections)).to_html()
    return files


def lens_summary(comparison: LensComparison) -> dict[str, Any]:
    kl, rank = comparison.mean_kl(), comparison.mean_rank()
    return {"text": comparison.text, "texts_sha256": list(comparison.text_hashes), "n_tokens": comparison.kl[0, 0].numel(),
            "per_stage": [{"stage": label, **{f"{lens} mean_kl": float(kl[k, s]) for k, lens in enumerate(comparison.lenses)},
                           **{f"{lens} mean_rank": float(rank[k, s]) for k, lens in enumerate(comparison.lenses)}}
                          for s, label in enumerate(comparison.layer_labels)],
            "tuned_lower_at_every_stage_but_last": bool((kl[1, :-1] < kl[0, :-1]).all())}


def lens_sections(comparison: LensComparison) -> list[Section]:
    return [
        Section("Logit lens vs tuned lens: KL to the model's output", (
            f"Mean KL(final || lens) in nats per stage on held-out text ({html.escape(comparison.text)}), 95% "
            "bootstrap bands over texts. Both are zero after the last block by construction."), plots.lens_kl(comparison)),
        Section("Logit lens vs tuned lens: rank of the final top token", (
            "Mean rank (0 = top) of the model's final top-1 token when the stream is read through each lens."),
            plots.lens_rank(comparison)),
    ]


def lens_files(comparison: LensComparison, lens: TunedLens | None, command: str, seconds: float,
               name: str) -> dict[str, str | bytes]:
    """`name`.csv, .json, .html, and with a trained lens `lens.safetensors` (the lens itself)."""
    summary: dict[str, Any] = {"command": command, "seconds": seconds, "model": comparison.provenance.model,
                               "versions": comparison.provenance.versions, "comparison": lens_summary(comparison)}
    facts = [("model", comparison.provenance.model), ("held-out text", comparison.text), ("command", command)]
    files: dict[str, str | bytes] = {}
    if lens is not None:
        summary["training"] = {"steps": lens.steps, "lr": lens.lr, "batch_tokens": lens.batch_tokens, "seed": lens.seed,
                               "text": lens.text, "n_tokens": lens.n_tokens, "seconds": lens.seconds,
                               "threads": lens.threads, "final_loss": float(lens.train_loss[-1]) if lens.steps else None,
                               "data": lens.data, "window": lens.window, "hold_out_every": lens.hold_out_every,
                               "train_texts_sha256": list(lens.train_texts),
                               "held_out_texts_sha256": list(lens.held_out_texts)}
        facts.append(("training", f"{lens.steps} Adam steps of {lens.batch_tokens} tokens, lr {lens.lr}, seed "
                                  f"{lens.seed}, on {lens.text}: {lens.seconds:.0f} s on {lens.threads} threads"))
        with tempfile.TemporaryDirectory() as folder:
            files["lens.safetensors"] = lens.save(Path(folder) / "lens.safetensors").read_bytes()
    files[f"{name}.csv"] = comparison.to_dataframe().to_csv(index=False)
    files[f"{name}.json"] = json.dumps(summary, indent=2) + "\n"
    files[f"{name}.html"] = Report(f"streamlens {name.replace('_', ' ')}: logit lens vs tuned lens", tuple(facts),
                                   tuple(lens_sections(comparison))).to_html()
    return files
