"""Components of the residual stream and their hook names: the only place a hook name is written.

A *site* is one writer into the stream: the token embedding, the positional embedding (models with
learned positions), the attention sublayer of layer L, the MLP sublayer of layer L, or one attention
head L.H. The final stream is `embed (+ pos_embed) + sum over layers of (attn L + mlp L)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"
FINAL_SCALE = "ln_final.hook_scale"
FINAL_STREAM = "ln_final.hook_in"

Kind = Literal["embed", "pos_embed", "attn", "mlp", "head", "block"]


def storing(store: dict, key: object, copy: bool = False):
    """A hook that puts the tensor it sees into `store[key]` and leaves the forward unchanged.

    `copy`: store a detached clone (safe to keep after the forward; the stored tensor then carries no
    graph). Without it the tensor itself is stored, graph and all, for callers that differentiate
    against it or read it within the same forward.
    """

    def hook(tensor, hook) -> None:
        store[key] = tensor.detach().clone() if copy else tensor

    return hook


def resid_pre(layer: int) -> str:
    """Stream entering block `layer`, [batch, pos, d_model]."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    """Stream leaving block `layer`, [batch, pos, d_model]."""
    return f"blocks.{layer}.hook_resid_post"


def attn_out(layer: int) -> str:
    """Write of the attention sublayer of `layer`, [batch, pos, d_model]."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """Write of the MLP sublayer of `layer`, [batch, pos, d_model]."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_post_scale(layer: int) -> str:
    """Scale of the norm applied to the attention output before it enters the stream (sandwich /
    post-norm models: Gemma 2/3, OLMo 2), [batch, pos, 1]."""
    return f"blocks.{layer}.ln1_post.hook_scale"


def attn_z(layer: int) -> str:
    """Per-head attention values before W_O, [batch, pos, n_heads, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """Attention pattern of `layer` after the softmax, [batch, head, dst_pos, src_pos]."""
    return f"blocks.{layer}.attn.hook_pattern"


def attn_v(layer: int) -> str:
    """Attention values of `layer`, [batch, src_pos, kv_head, d_head] (kv_head < head with grouped queries)."""
    return f"blocks.{layer}.attn.hook_v"


@dataclass(frozen=True, order=True)
class Site:
    """One writer into the residual stream.

    `layer` is None for the embeddings; `head` is set only for kind "head". Kind "block" stands for
    attention and MLP of one layer together (an ablation unit, not a single write).
    """

    kind: Kind
    layer: int | None = None
    head: int | None = None

    @property
    def label(self) -> str:
        if self.kind in ("embed", "pos_embed"):
            return self.kind
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        return f"{self.kind} {self.layer}"

    @property
    def hook_names(self) -> tuple[str, ...]:
        """Hook points that carry this site's write (a head's write is inside `hook_z`)."""
        if self.kind == "embed":
            return (EMBED,)
        if self.kind == "pos_embed":
            return (POS_EMBED,)
        assert self.layer is not None
        if self.kind == "attn":
            return (attn_out(self.layer),)
        if self.kind == "mlp":
            return (mlp_out(self.layer),)
        if self.kind == "block":
            return (attn_out(self.layer), mlp_out(self.layer))
        return (attn_z(self.layer),)

    @property
    def hook_name(self) -> str:
        """The one hook point of a single write (not a block, which is two writes)."""
        if self.kind == "block":
            raise ValueError(f"{self.label!r} is two writes ({', '.join(self.hook_names)}), not one")
        return self.hook_names[0]

    @staticmethod
    def parse(text: str) -> "Site":
        """Parse 'embed', 'attn 3', 'mlp 3', 'block 3', 'L3H2' (the inverse of `label`)."""
        cleaned = text.strip()
        if cleaned in ("embed", "pos_embed"):
            return Site(cleaned)  # type: ignore[arg-type]
        if cleaned.upper().startswith("L") and "H" in cleaned.upper():
            layer, head = cleaned.upper()[1:].split("H")
            return Site("head", int(layer), int(head))
        kind, _, layer = cleaned.partition(" ")
        if kind in ("attn", "mlp", "block") and layer.strip().isdigit():
            return Site(kind, int(layer))  # type: ignore[arg-type]
        raise ValueError(f"unknown site {text!r}: use embed, pos_embed, 'attn L', 'mlp L', 'block L' or 'LxHy'")


MAX_NUMBER = 65535  # no model has more layers or heads; bounds a range before the model is loaded


def parse_numbers(text: str, name: str = "layers", count: int | None = None) -> tuple[int, ...]:
    """'0-5,9' -> (0, 1, 2, 3, 4, 5, 9): numbers and ranges, each number once, in the order given.

    Args:
        text: comma-separated whole numbers and ranges `a-b` (a <= b).
        name: what the numbers are, for errors ("layers", "heads", "--layers").
        count: when given, every number must be below it (e.g. the model's number of layers).
    """
    numbers: dict[int, None] = {}
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"{name} {text!r} not understood: use numbers and ranges such as 0-5,9") from None
        if high < low:
            raise ValueError(f"range {part.strip()!r} in {name} {text!r} runs backwards: write {high}-{low}")
        if count is None and high > MAX_NUMBER:  # before the model says how many: no range of a billion
            raise ValueError(f"{high} in {name} {text!r} is too large: numbers run 0-{MAX_NUMBER}")
        if count is not None and high >= count:
            noun = name.lstrip("-")
            raise ValueError(f"{noun.rstrip('s')} {high} out of range in {name} {text!r}: model has {count} {noun} "
                             f"(0-{count - 1})")
        numbers.update(dict.fromkeys(range(low, high + 1)))
    return tuple(numbers)


def parse_layers(spec: str, n_layers: int, name: str = "layers") -> tuple[int, ...]:
    """A set of layers, sorted: "none" (or empty), "all", or numbers and ranges ("0,10-12"; `parse_numbers`)."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return tuple(range(n_layers))
    try:
        return tuple(sorted(parse_numbers(text, name, n_layers)))
    except ValueError as error:
        raise ValueError(f"{error} (or none, all)") from None
