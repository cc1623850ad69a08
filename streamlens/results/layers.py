"""Results of the layer study (`streamlens.importance`): cheap stream scores, self-repair, and the study.

`StreamScores` and `SelfRepair` are single results (save/load); `LayerStudy` bundles them with the
ablation results of the study (each an `AblationResult` / `CumulativeAblation`), the Spearman
correlations and the verdict rows, and gives one tidy table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from streamlens.results.ablation import AblationResult, CumulativeAblation, as_sites
from streamlens.results.base import Provenance, Result, frame
from streamlens.sites import Site

if TYPE_CHECKING:
    import pandas as pd

WRITE_KINDS = ("block", "attn", "mlp")


def depth(layer: int, n_layers: int) -> float:
    """Depth-normalised position l / (L - 1) (0: first block, 1: last)."""
    return layer / max(n_layers - 1, 1)


@dataclass(frozen=True)
class StreamScores(Result):
    """Cheap scores from one clean pass, per text (mean over the text's real positions).

    Shapes (L = n_layers; x_l = resid_pre l, x_L = the final stream):
        block_influence [layer, text]: 1 - cos(x_l, x_{l+1}) (ShortGPT's BI).
        angular_distance [span, start, text]: arccos(cos(x_s, x_{s+n})) / pi for n = span + 1
            (Gromov et al.); NaN where s + n > L.
        relative_norm [kind, layer, text]: ||write|| / ||stream it reads||, kinds `WRITE_KINDS`
            (block: x_{l+1} - x_l over x_l; attn over x_l; mlp over resid_mid l).
        sublayer_influence [kind, layer, text]: 1 - cos(stream in, stream in + write) for kinds
            block, attn, mlp (He et al.'s importance score; block equals `block_influence`).
    """

    provenance: Provenance
    block_influence: Float[torch.Tensor, "layer text"]
    angular_distance: Float[torch.Tensor, "span start text"]
    relative_norm: Float[torch.Tensor, "kind layer text"]
    sublayer_influence: Float[torch.Tensor, "kind layer text"]
    data: str

    @property
    def n_layers(self) -> int:
        return self.block_influence.shape[0]

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (score, kind, layer, span): score, kind, layer, span, depth, value (mean over texts)."""
        n = self.n_layers
        rows: list[dict[str, Any]] = []
        for k, kind in enumerate(WRITE_KINDS):
            for layer in range(n):
                for score, tensor in (("relative_norm", self.relative_norm), ("influence", self.sublayer_influence)):
                    rows.append({"score": score, "kind": kind, "layer": layer, "span": 1, "depth": depth(layer, n),
                                 "value": float(tensor[k, layer].mean())})
        for span in range(self.angular_distance.shape[0]):
            for start in range(n - span):
                rows.append({"score": "angular_distance", "kind": "block", "layer": start, "span": span + 1,
                             "depth": depth(start, n), "value": float(self.angular_distance[span, start].mean())})
        return frame(rows)


@dataclass(frozen=True)
class SelfRepair(Result):
    """Direct vs total effect of resample-ablating each unit, on the clean label's logit.

    Per unit and text (mean over the text's scored predictions), in logits, with x the clean final
    stream, x' the ablated one, h / h' the unit's write and its replacement, s / s' the final norm's
    scale on x / x', and G_s(v) = (w * centre(v) / s) @ W_U[:, label]:
        total = logit(x') - logit(x)              (the model's own final norm on both)
        direct = G_s(h' - h)                      (the write's own path, norm scale frozen)
        downstream = G_s(x' - x - (h' - h))       (later layers reacting)
        norm = G_s'(x') - G_s(x')                 (the final norm's rescaling alone)
    so direct + downstream + norm = total exactly. Repair = direct - total = -(downstream + norm).
    """

    provenance: Provenance
    sites: tuple[Site, ...]
    direct: Float[torch.Tensor, "unit text"]
    downstream: Float[torch.Tensor, "unit text"]
    norm: Float[torch.Tensor, "unit text"]
    total: Float[torch.Tensor, "unit text"]
    n_layers: int
    data: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", as_sites(self.sites))

    def repaired_fraction(self, texts: torch.Tensor | None = None) -> torch.Tensor:
        """Per unit: (direct - total) / direct on the mean over `texts` (all by default) [unit]."""
        pick = slice(None) if texts is None else texts
        direct, total = self.direct[:, pick].mean(-1), self.total[:, pick].mean(-1)
        return (direct - total) / direct

    def norm_fraction(self, texts: torch.Tensor | None = None) -> torch.Tensor:
        """Per unit: the part of the direct effect undone by the final norm's rescaling, -norm / direct [unit]."""
        pick = slice(None) if texts is None else texts
        return -self.norm[:, pick].mean(-1) / self.direct[:, pick].mean(-1)

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per unit: unit, kind, layer, head, depth, direct, downstream, norm, total, repaired_fraction,
        norm_fraction (means over texts; logits of the label token)."""
        fraction, norm_fraction = self.repaired_fraction(), self.norm_fraction()
        rows = []
        for index, site in enumerate(self.sites):
            rows.append({"unit": site.label, "kind": site.kind, "layer": site.layer, "head": site.head,
                         "depth": depth(site.layer, self.n_layers),
                         **{name: float(getattr(self, name)[index].mean()) for name in
                            ("direct", "downstream", "norm", "total")},
                         "repaired_fraction": float(fraction[index]), "norm_fraction": float(norm_fraction[index])})
        return frame(rows)


@dataclass(frozen=True)
class Verdict:
    """One row of the verdict table."""

    claim: str
    protocol: str
    number: str
    value: float
    ci_low: float
    ci_high: float
    paper: str
    verdict: str  # "holds" | "differs" | "unclear"


@dataclass(frozen=True)
class LayerStudy:
    """Everything `streamlens layers` measured on one model.

    Ablation rows are removals with method zero, total effect, unless named otherwise: `blocks`,
    `attn`, `mlp` (one unit each), `swaps` (method "swap": blocks L and L+1 trade places), `spans`
    (contiguous sets of blocks), `greedy` (kind -> greedy cumulative removal), `repair` (resample).
    `correlations`: score name -> (Spearman rho with block damage, 95% CI low, high).
    """

    model: str
    n_layers: int
    scores: StreamScores
    blocks: AblationResult
    attn: AblationResult
    mlp: AblationResult
    swaps: AblationResult
    spans: AblationResult
    predicted_spans: tuple[tuple[int, int], ...]  # (size n, start) the angular distance picks, n = 1..L/2
    greedy: dict[str, CumulativeAblation]
    repair: SelfRepair
    correlations: dict[str, tuple[float, float, float]]
    verdicts: tuple[Verdict, ...]
    seconds: float

    def span_rows(self) -> dict[tuple[int, int], int]:
        """(size n, start) -> row of `spans`."""
        return {(len(unit), unit[0].layer): index for index, unit in enumerate(self.spans.sites)}

    def measured_sizes(self) -> list[int]:
        """Span sizes whose every span was measured (more than one span of that size in `spans`)."""
        sizes = [size for size, _ in self.span_rows()]
        return sorted({size for size in sizes if sizes.count(size) > 1})

    def to_dataframe(self) -> "pd.DataFrame":
        """Tidy: model, part, unit, kind, layer, depth, method, metric, value, ci_low, ci_high (ablations),
        plus the scores (part "score") and self-repair (part "repair", metric = the effect part)."""
        import pandas as pd

        parts = [("block", self.blocks), ("attn", self.attn), ("mlp", self.mlp), ("swap", self.swaps),
                 ("span", self.spans)]
        tables = []
        for name, result in parts:
            table = result.to_dataframe()
            table.insert(0, "part", name)
            tables.append(table)
        for kind, curve in self.greedy.items():
            table = curve.to_dataframe()
            table.insert(0, "part", f"greedy {kind}")
            tables.append(table)
        scores = self.scores.to_dataframe().rename(columns={"score": "metric"})
        scores.insert(0, "part", "score")
        tables.append(scores)
        repair = self.repair.to_dataframe().melt(id_vars=["unit", "kind", "layer", "head", "depth"],
                                                 var_name="metric", value_name="value")
        repair.insert(0, "part", "repair")
        tables.append(repair)
        out = pd.concat(tables, ignore_index=True)
        if "layer" in out:
            out["depth"] = [None if pd.isna(layer) else depth(int(layer), self.n_layers) for layer in out["layer"]]
        out.insert(0, "model", self.model)
        return out
