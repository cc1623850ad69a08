"""What an ablation is: the spec (units, method, effect), the units of a model, stream order.

See the package docstring for the methods and effects; `replace.py` computes what takes a removed
write's place, `apply.py` puts it into a forward, `engine.py` evaluates many specs fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from streamlens.model import Model
from streamlens.sites import Site

METHODS = ("zero", "mean", "resample")
EFFECTS = ("total", "direct")
UNIT_KINDS = ("block", "attn", "mlp", "head")
CUMULATIVE_MODES = ("order", "greedy")
Progress = Callable[[int], None]


# ----- specs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ablation:
    """Remove the writes of `sites` with `method` ("zero" | "mean" | "resample"), measuring the
    `effect` ("total" | "direct"). No sites: nothing is removed (the clean model)."""

    sites: tuple[Site, ...] = ()
    method: str = "zero"
    effect: str = "total"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.effect not in EFFECTS:
            raise ValueError(f"unknown effect {self.effect!r}: choose from {', '.join(EFFECTS)}")
        for site in self.sites:
            if site.kind not in UNIT_KINDS:
                raise ValueError(f"cannot ablate {site.label!r}: a unit is a block, attn, mlp or head site")
        self.writes  # noqa: B018 - raises on overlapping units

    @property
    def label(self) -> str:
        return " + ".join(site.label for site in self.sites) or "nothing"

    @property
    def writes(self) -> tuple[Site, ...]:
        """The single writes removed (block L -> attn L, mlp L), in stream order."""
        out: list[Site] = []
        for site in self.sites:
            for write in (Site("attn", site.layer), Site("mlp", site.layer)) if site.kind == "block" else (site,):
                clash = [w for w in out if w == write or (w.layer == write.layer and {w.kind, write.kind} == {"attn", "head"})]
                if clash:
                    raise ValueError(f"ablation units overlap: {write.label} and {clash[0].label} in {self.label!r}")
                out.append(write)
        return tuple(sorted(out, key=stream_order))

    @property
    def first_layer(self) -> int | None:
        return min((site.layer for site in self.sites), default=None)

    def check(self, model: Model) -> "Ablation":
        """Raise ValueError naming a layer or head the model does not have, or a direct head effect
        through a post-norm (the head's write is not z @ W_O there: the norm rescales the sum)."""
        for site in self.sites:
            model.check_layer(site.layer)
            if site.kind == "head":
                model.check_head(site.head)
                if self.effect == "direct" and model.attn_post_norm(site.layer) is not None:
                    raise ValueError(f"direct effect of head {site.label} is not defined exactly: layer {site.layer} of "
                                     f"{model.info.architecture} normalises the attention output after the heads "
                                     f"(post-norm); use effect total, or unit attn for the direct effect")
        return self


def stream_order(write: Site) -> tuple[int, int, int]:
    return (write.layer, 1 if write.kind == "mlp" else 0, -1 if write.head is None else write.head)


def units(model: Model, kind: str = "block", layers: Sequence[int] | None = None,
          heads: Sequence[int] | None = None) -> list[Site]:
    """Every single unit of one kind, layer by layer (heads: every head of every chosen layer)."""
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown unit {kind!r}: choose from {', '.join(UNIT_KINDS)}")
    chosen = range(model.n_layers) if layers is None else [model.check_layer(layer) for layer in layers]
    if kind == "head":
        chosen_heads = range(model.n_heads) if heads is None else [model.check_head(head) for head in heads]
        return [Site("head", layer, head) for layer in chosen for head in chosen_heads]
    if heads is not None:
        raise ValueError(f"heads {list(heads)} given for unit {kind!r}: heads apply only to unit 'head'")
    return [Site(kind, layer) for layer in chosen]
