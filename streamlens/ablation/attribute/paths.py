"""Estimates along the path from the clean model to the ablated one, for every unit of a kind at once:
integrated gradients (`ig`, N steps) and a second-order Taylor term (`second-order`).

The path. Every chosen unit has a point p_u in the forward: a head its z slot (`hook_z`), attn / mlp
their write, a block the stream after it (at `hook_mlp_out`, whose gradient is d M / d resid_post).
At alpha in [0, 1] all points move together toward their replacement inside one forward,

    p_u(alpha) = p_u + alpha * (r_u - p_u)            (block: mlp_out + alpha * (r_attn + r_mlp - attn - mlp))

where p_u is the point's value in that forward (later units react to earlier ones), so alpha = 0 is
the clean model and a lone unit at alpha = 1 is its exact (total) ablation. With d_u = r_u - p_u at
alpha = 0 and g_u(alpha) = d M / d p_u on that forward:

- `ig` (left Riemann rule): IG_N(u) = 1/N * sum_{k=0}^{N-1} d_u . g_u(k / N). N = 1 is plain AtP.
  For a lone unit IG_N -> M(ablated) - M(clean) as N grows, with error O(1/N). The rule is the
  left one so that N = 1 is AtP and IG_{N/2} uses a subset of the same points: the error bar
  |IG_N - IG_{N/2}| costs nothing (Richardson: the left rule's error at N is about that size).
  Cost: N gradient forwards and backwards.
- `second-order`: d_u . g_u(0) + 1/2 d_u . dg_u/dalpha(0), the second-order Taylor expansion of the
  same path (for a lone unit: of M(alpha) at 0, evaluated at 1). dg/dalpha comes from double
  backward (reverse over reverse): one backward with `create_graph`, then the vector-Jacobian
  trick for the Jacobian-vector product. Error bar: the size of the second-order term.

With many units moving at once the path is the EAP-IG one (Hanna et al. 2024), not each unit's own:
what a unit's gradient sees at alpha > 0 includes every other unit's partial removal.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from streamlens import sites
from streamlens.ablation.attribute.common import dot, leaf, per_text_metrics
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.sites import Site


def point_name(site: Site) -> str:
    """The hook whose output is the unit's point: a block's is the MLP write (then the stream after it)."""
    return sites.mlp_out(site.layer) if site.kind == "block" else site.hook_name


class PathChunk:
    """The path of one chunk of texts: forwards at chosen alphas and the per-unit dot products."""

    def __init__(self, model: Model, batch: TokenBatch, chosen: list[Site], names: tuple[str, ...],
                 replacements: dict[Site, torch.Tensor]):
        self.model, self.batch, self.chosen, self.names = model, batch, chosen, names
        self.replacements = replacements
        self.points = sorted({point_name(site) for site in chosen})
        self.blocks = {site.layer for site in chosen if site.kind == "block"}
        self.heads: dict[str, list[int]] = {}
        for site in chosen:
            if site.kind == "head":
                self.heads.setdefault(site.hook_name, []).append(site.head)
        self.deltas: dict[Site, torch.Tensor] = {}  # d_u, from the alpha = 0 forward
        self.clean_loss = torch.zeros(batch.n_texts, dtype=torch.float64)

    def _move(self, name: str, tensor: torch.Tensor, kept: dict[str, torch.Tensor]) -> torch.Tensor:
        """r - p for the point `name` (zeros outside the chosen head slots)."""
        layer = int(name.split(".")[1])
        if name in self.heads:
            move = torch.zeros_like(tensor)
            for head in self.heads[name]:
                move[:, :, head] = self.replacements[Site("head", layer, head)] - tensor[:, :, head]
            return move
        if layer in self.blocks:
            attn = kept[sites.attn_out(layer)]
            return (self.replacements[Site("attn", layer)] + self.replacements[Site("mlp", layer)]
                    - attn - tensor)
        return self.replacements[Site(_kind(name), layer)] - tensor

    def forward(self, alpha: float | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                           dict[str, torch.Tensor]]:
        """One gradient-enabled forward at `alpha`: per-text metrics [metric, n], the moved points
        {hook name: tensor} (differentiate against these) and the moves r - p {hook name: tensor}."""
        kept: dict[str, torch.Tensor] = {}
        moved: dict[str, torch.Tensor] = {}
        moves: dict[str, torch.Tensor] = {}

        def mix(name: str):
            def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
                moves[name] = self._move(name, tensor, kept)
                moved[name] = tensor + alpha * moves[name]
                return moved[name]

            return hook

        blocks = [sites.attn_out(layer) for layer in sorted(self.blocks)]
        hooks = [(sites.EMBED, leaf)] + [(name, sites.storing(kept, name)) for name in blocks] + [(n, mix(n)) for n in self.points]
        with torch.inference_mode(False), torch.enable_grad():
            final = self.model.run_to(self.batch.tokens, sites.FINAL_STREAM, hooks)
            per_text, loss = per_text_metrics(self.model, self.batch, final, self.names)
        if not self.deltas:
            self.clean_loss = loss
        return per_text, moved, moves

    def _record_deltas(self, moves: dict[str, torch.Tensor]) -> None:
        self.deltas = {site: self._part(site, moves[point_name(site)]).detach() for site in self.chosen}

    @staticmethod
    def _part(site: Site, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, :, site.head] if site.kind == "head" else tensor

    def _dots(self, gradients: dict[str, torch.Tensor]) -> Float[torch.Tensor, "unit n"]:
        return torch.stack([dot(self.deltas[site], self._part(site, gradients[point_name(site)]))
                            for site in self.chosen])

    def _gradients(self, value: torch.Tensor, moved: dict[str, torch.Tensor],
                   **options: Any) -> dict[str, torch.Tensor]:
        grads = torch.autograd.grad(value, [moved[n] for n in self.points], allow_unused=True, **options)
        return {n: (torch.zeros_like(moved[n]) if g is None else g) for n, g in zip(self.points, grads)}

    def ig(self, steps: int) -> tuple[Float[torch.Tensor, "unit metric n"], Float[torch.Tensor, "unit metric n"] | None]:
        """IG_N per text, and IG_{N/2} from the even steps (None when N is odd)."""
        total = torch.zeros(len(self.chosen), len(self.names), self.batch.n_texts, dtype=torch.float64)
        half = torch.zeros_like(total) if steps % 2 == 0 else None
        for step in range(steps):
            per_text, moved, moves = self.forward(step / steps)
            if step == 0:
                self._record_deltas(moves)
            for metric in range(len(self.names)):
                last = metric == len(self.names) - 1
                grads = self._gradients(per_text[metric].sum(), moved, retain_graph=not last)
                dots = self._dots(grads)
                total[:, metric] += dots / steps
                if half is not None and step % 2 == 0:
                    half[:, metric] += dots * 2 / steps
        return total, half

    def second_order(self) -> tuple[Float[torch.Tensor, "unit metric n"], Float[torch.Tensor, "unit metric n"]]:
        """(first-order term d . g(0), second-order term 1/2 d . dg/dalpha(0)) per text."""
        alpha = torch.zeros((), dtype=self.model.dtype, device=self.model.device, requires_grad=True)
        first = torch.zeros(len(self.chosen), len(self.names), self.batch.n_texts, dtype=torch.float64)
        second = torch.zeros_like(first)
        with torch.inference_mode(False), torch.enable_grad():
            per_text, moved, moves = self.forward(alpha)
            self._record_deltas(moves)
            for metric in range(len(self.names)):
                grads = self._gradients(per_text[metric].sum(), moved, create_graph=True, retain_graph=True)
                first[:, metric] = self._dots({n: g.detach() for n, g in grads.items()})
                probes = {n: torch.zeros_like(g, requires_grad=True) for n, g in grads.items()}
                live = [n for n in self.points if grads[n].requires_grad]
                (along,) = torch.autograd.grad([grads[n] for n in live], alpha, [probes[n] for n in live],
                                               create_graph=True, retain_graph=True, allow_unused=True)
                if along is None:  # the gradient does not move along the path: no second-order term
                    continue
                slopes = self._gradients(along, probes, retain_graph=True)
                second[:, metric] = 0.5 * self._dots({n: s.detach() for n, s in slopes.items()})
        return first, second


def _kind(hook_name: str) -> str:
    return "attn" if hook_name.endswith("hook_attn_out") else "mlp"
