"""Which layers matter, and why: the layer-removal study against the literature's own protocols.

- `scores`: cheap scores from one clean pass (Block Influence, angular distance of spans, relative
  write norms, sublayer influence) and their Spearman correlation with measured damage (CI over texts);
- `repair`: self-repair, the label-logit effect of resample-ablating a unit split exactly into direct,
  downstream and final-norm parts;
- `verdict`: the claims of the papers, this model's numbers with 95% CIs, holds / differs;
- `study`: everything on one model (`layer_study -> LayerStudy`): block, attention and MLP removal,
  adjacent swaps (`ablation.swap`), spans of n = 1 .. L/2 blocks (predicted by the angular distance
  and, for some sizes, every span measured), greedy cumulative removal per kind, self-repair.

Results live in `streamlens.results.layers`, figures in `streamlens.plots.layers`, the page in
`streamlens.pages.layers`.
"""

from streamlens.importance.repair import self_repair
from streamlens.importance.scores import spearman, spearman_ci, stream_scores
from streamlens.importance.study import StudyConfig, layer_study, predicted_spans, span_ablation, stage_sizes
from streamlens.importance.verdict import PAPERS, removable, verdicts
from streamlens.results.layers import LayerStudy, SelfRepair, StreamScores, Verdict, depth

__all__ = ["PAPERS", "LayerStudy", "SelfRepair", "StreamScores", "StudyConfig", "Verdict", "depth", "layer_study",
           "predicted_spans", "removable", "self_repair", "span_ablation", "spearman", "spearman_ci", "stage_sizes",
           "stream_scores", "verdicts"]
