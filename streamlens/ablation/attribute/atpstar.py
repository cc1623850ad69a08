"""Plain attribution patching (AtP) and AtP*'s two fixes, from one gradient-enabled clean forward.

The exact engine runs one partial forward per unit. Attribution patching (Nanda 2023) estimates the
effect of replacing *every* unit's write from one clean forward, one backward pass and the
replacement writes: with `M` a per-text metric and `w` a unit's clean write,

    M(replaced) - M(clean) ~ (replacement - write) . dM/dwrite        (summed over positions, d_model)

per text, then the same bootstrap CIs over texts as the engine, in the same `AblationResult`
(`estimate` names the method; the CSV and every figure say "estimate").

What is estimated, exactly:
- units and replacements are the engine's (`replace.py`: zero | mean | resample, the same means and
  the same seeded donors), always the *total* effect;
- heads: the gradient at `hook_z` (write z_h @ W_O[h] is linear in z_h, so (z' - z) . dM/dz equals
  the estimate in d_model space); attn / mlp: the gradient at `hook_attn_out` / `hook_mlp_out`; a
  block replaces both writes, so mlp L is no longer a function of attn L: both use the gradient at
  `hook_mlp_out L` (= d M / d resid_post L);
- metrics with a useful gradient only: loss_increase, target_logit_change, target_prob_change. KL
  (clean || ablated) has value and gradient zero at the clean model (its first-order estimate is
  identically 0) and top-1 agreement is piecewise constant: both are left out (asking for them is an
  error), not estimated by a second-order term.
- a linear path is exact: for the direct effect on a target logit with the final norm frozen the
  estimate is the exact change (tests check it, and the finite differences of the gradients).

AtP*'s fixes (Kramar et al. 2024), adapted to units that are *writes* into the stream:
- QK fix (`estimate="atp-qk"` or `"atpstar"`): the linear estimate of a change that flows through a
  later attention layer's softmax is poor when the pattern saturates. For each unit u and each later
  layer L' the linear term through L''s queries and keys, (delta_u . d A_L'/d resid_pre_L') . dM/dA_L',
  is replaced by the exact pattern change, (A_L'(resid_pre_L' + delta_u) - A_L') . dM/dA_L', where
  A_L' is recomputed by a partial forward (`Model.run_to`, start at L', stop at its pattern) with
  the unit's write change added to the clean stream entering L'. Not implemented: the paper patches
  query/key nodes themselves; here the change reaching L' is the unit's own write (the reaction of
  the layers in between stays linear), and dM/dA_L' stays the clean gradient. Costs one partial
  attention forward per (unit, later layer) pair: far more than AtP itself (see the README).
- GradDrop (`"atpstar"`): the estimate is recomputed L times, each time with the gradient through
  layer l's writes (attn_out l and mlp_out l) set to zero in the backward pass, and the score
  `cancellation = 1/(L-1) * sum_l |mean over texts of the estimate with layer l dropped|` is kept
  next to the estimate (`AblationResult.cancellation`). By the triangle inequality it is large when
  paths that cancel in the plain estimate are large on their own; `verify` ranks units by
  max(|estimate|, score) when it is present. It is computed on the plain AtP gradients (not the QK
  fixed ones) and costs L extra backward passes.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float

from streamlens import metrics as M
from streamlens import sites
from streamlens.ablation import replace as R
from streamlens.ablation.attribute.common import dot, leaf, token_values
from streamlens.ablation.spec import Ablation
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.sites import Site


class _Gates:
    """Which layer's writes pass no gradient in the current backward pass (GradDrop); None: all pass."""

    dropped: int | None = None


class _Gate(torch.autograd.Function):
    """Identity forward; backward multiplies by 0 while `gates.dropped == layer`."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, gates: _Gates, layer: int) -> torch.Tensor:
        ctx.gates, ctx.layer = gates, layer
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return (grad * 0 if ctx.gates.dropped == ctx.layer else grad), None, None


class AtpChunk:
    """One gradient-enabled clean forward of some texts and what the estimates need from it."""

    def __init__(self, model: Model, batch: TokenBatch, chosen: list[Site], writes: list[Site],
                 names: tuple[str, ...], replacements: dict[Site, torch.Tensor], estimate: str):
        self.model, self.chosen, self.names, self.estimate_name = model, chosen, names, estimate
        self.gates = _Gates()
        self.tensors: dict[str, torch.Tensor] = {}
        qk = estimate != "atp"
        grad_names = {self._grad_hook(site) for site in chosen}
        value_names = {w.hook_name for w in writes}
        extra = {sites.resid_pre(layer) for layer in range(1, model.n_layers)} if qk else set()
        extra |= {sites.attn_pattern(layer) for layer in range(1, model.n_layers)} if qk else set()
        gated = ({sites.attn_out(layer) for layer in range(model.n_layers)}
                 | {sites.mlp_out(layer) for layer in range(model.n_layers)}) if estimate == "atpstar" else set()
        hooks = [(sites.EMBED, leaf)] + [(name, self._keep(name, name in gated))
                                          for name in sorted(grad_names | value_names | extra | gated)]
        text_index, position = batch.scored.nonzero(as_tuple=True)
        self.text_index, self.n_texts = text_index, batch.n_texts
        with torch.inference_mode(False), torch.enable_grad():
            final = model.run_to(batch.tokens, sites.FINAL_STREAM, hooks)
            logits = model.final_norm(final[text_index, position]) @ model.W_U + model.b_U
            labels = batch.labels[text_index, position]
            targets = None if batch.targets is None else batch.targets[text_index]
            self.per_text = M.per_text_means(token_values(logits, labels, targets, names), text_index, batch.n_texts)
        self.clean_loss = M.per_text_means(token_values(logits.detach(), labels, None, ("loss_increase",))[0],
                                           text_index, batch.n_texts).double().cpu()
        self.grad_names = sorted(grad_names)
        self.deltas = {w: replacements[w] - R.part(w, self.tensors[w.hook_name].detach())
                       for w in writes}
        self.grads = [self._grads(index) for index in range(len(names))]  # [metric] {hook name: grad}

    def _grad_hook(self, site: Site) -> str:
        return sites.mlp_out(site.layer) if site.kind == "block" else site.hook_name

    def _keep(self, name: str, gate: bool):
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            # returned, not None: the bridge uses a converted copy (hook_z) only when a hook returns it
            self.tensors[name] = tensor
            return _Gate.apply(tensor, self.gates, layer) if gate else tensor

        return hook

    def _grads(self, metric: int, inputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        names = self.grad_names if inputs is None else inputs
        grads = torch.autograd.grad(self.per_text[metric].sum(), [self.tensors[n] for n in names],
                                    retain_graph=True, allow_unused=True)
        return {n: (torch.zeros_like(self.tensors[n]) if g is None else g.detach()) for n, g in zip(names, grads)}

    def estimate(self, grads: list[dict[str, torch.Tensor]] | None = None) -> Float[torch.Tensor, "unit metric text"]:
        """Plain AtP: sum over writes of (replacement - write) . gradient, per text."""
        grads = self.grads if grads is None else grads
        out = torch.zeros(len(self.chosen), len(self.names), self.n_texts, dtype=torch.float64)
        for row, site in enumerate(self.chosen):
            for write in Ablation((site,)).writes:
                for metric, by_name in enumerate(grads):
                    gradient = R.part(write, by_name[self._grad_hook(site)])
                    out[row, metric] += dot(self.deltas[write], gradient)
        return out

    def grad_drop(self) -> Float[torch.Tensor, "layer unit metric text"]:
        """The plain estimate with the gradient through each layer's writes dropped in turn."""
        out = []
        for layer in range(self.model.n_layers):
            self.gates.dropped = layer
            try:
                out.append(self.estimate([self._grads(index) for index in range(len(self.names))]))
            finally:
                self.gates.dropped = None
        return torch.stack(out)

    def write_delta(self, site: Site) -> torch.Tensor:
        """The unit's change of the stream, replacement - write, [n, pos, d_model] (broadcast)."""
        return sum(R.as_write(self.model, w, self.deltas[w]) for w in Ablation((site,)).writes)

    def qk_fix(self, batch_size: int) -> Float[torch.Tensor, "unit metric text"]:
        """Per unit: sum over later layers L' of (exact - linear) pattern term (module docstring)."""
        later = range(1, self.model.n_layers)
        pattern_names = [sites.attn_pattern(layer) for layer in later]
        d_patterns = [self._grads(metric, pattern_names) for metric in range(len(self.names))]  # dM/dA_L'
        out = torch.zeros(len(self.chosen), len(self.names), self.n_texts, dtype=torch.float64)
        for layer in later:
            rows = [row for row, site in enumerate(self.chosen) if site.layer < layer]
            d_pattern = torch.stack([d[sites.attn_pattern(layer)] for d in d_patterns])  # [metric, n, h, q, k]
            exact = self._exact_pattern_terms(layer, rows, d_pattern, batch_size)  # [unit, metric, n]
            pattern, resid = self.tensors[sites.attn_pattern(layer)], self.tensors[sites.resid_pre(layer)]
            for metric in range(len(self.names)):
                with torch.inference_mode(False), torch.enable_grad():  # the q/k path only: A_L'(resid_pre_L')
                    (qk_grad,) = torch.autograd.grad(pattern, resid, d_pattern[metric], retain_graph=True)
                linear = torch.stack([dot(self.write_delta(self.chosen[row]), qk_grad) for row in rows])
                out[rows, metric] += exact[:, metric] - linear
        return out

    def _exact_pattern_terms(self, layer: int, rows: list[int], d_pattern: torch.Tensor,
                             batch_size: int) -> torch.Tensor:
        """(A_L'(resid + delta_u) - A_L') . dM/dA_L' per text for the units `rows`: [unit, metric, n]."""
        n = self.n_texts
        clean_pattern = self.tensors[sites.attn_pattern(layer)].detach()
        resid = self.tensors[sites.resid_pre(layer)].detach()
        per_forward = max(1, batch_size // n)
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), per_forward):
                group = rows[start : start + per_forward]
                streams = torch.cat([resid + self.write_delta(self.chosen[row]) for row in group])
                patterns = self.model.run_to(streams, sites.attn_pattern(layer), start_at_layer=layer)
                change = einops.rearrange(patterns, "(k n) h q s -> k n h q s", k=len(group)) - clean_pattern
                out.append(einops.einsum(change.double(), d_pattern.double(), "k n h q s, m n h q s -> k m n"))
        return torch.cat(out).cpu()
