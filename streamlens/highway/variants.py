"""The residual family: seven ways to connect a sublayer F to the stream, one module each.

Every connection wraps a sublayer `F: [..., width] -> [..., width]` and has the same call,
`connection(x, history) -> y`, where `history` lists the stream states the stack has produced so far
(the stack's input first, then every earlier connection's output; `history[-1]` is `x`). Only the
two dense variants read it.

    plain       y = F(x)
    pre_norm    y = x + F(LN(x))                                  (GPT-2 and most modern LMs)
    post_norm   y = LN(x + F(x))                                  (Vaswani et al. 2017)
    highway     y = T(x) * F(x) + (1 - T(x)) * x,  T(x) = sigmoid(W_T x + b_T)  (Srivastava et al. 2015)
    rezero      y = x + a * F(x), a a learnt scalar, 0 at init    (Bachlechner et al. 2020; SkipInit, De & Smith 2020)
    dense       y = a_self * (x + F(LN(x))) + sum_j a_j * history[j]   (DenseFormer, Pagliardini et al. 2024)
    concat      y = F(LN(P [history[0], ..., history[-1]]))      (DenseNet-style concatenation, Huang et al. 2017)

Gate bias. Srivastava, Greff & Schmidhuber (2015, "Highway Networks", arXiv:1505.00387, Sec. 2.2)
initialise the transform-gate bias b_T to a negative value, "e.g. -1, -3", so that every layer starts
close to carrying its input. We use `GATE_BIAS = -2.0`, the middle of that range: T(x) ~ sigmoid(-2) =
0.12 at init.

Which dense variant, and why. The main dense variant is DenseFormer's depth-weighted average
(`dense`): a weighted sum of all earlier stream states, initialised to the pre-norm residual block
(a_self = 1, a_j = 0), so the width never changes and it drops into a Transformer of any depth. As
in DenseFormer, the weighted sum runs over earlier states; we average stream states (outputs of the
weighted sums) rather than raw block outputs, which spans the same set of functions and lets every
connection share one call. DenseNet's concatenation (`concat`) is what the "dense connections cost
memory" claim is about: block l sees an input of width (l + 1) * width, so the tensors saved for the
backward pass grow quadratically with depth. It is here to measure that claim (`concat` projects the
concatenation back to `width` with a learnt P, then applies F; it has no additive skip, as DenseNet).

Deleting a connection at test time (`streamlens.highway.lesion`) replaces it by the identity, y = x.
"""

from __future__ import annotations

import torch
from torch import nn

from streamlens.results.residuals import VARIANTS

GATE_BIAS = -2.0  # Srivastava et al. 2015, Sec. 2.2: "a negative value (e.g. -1, -3 etc.)"


class Plain(nn.Module):
    """y = F(x): no skip."""

    def __init__(self, sublayer: nn.Module) -> None:
        super().__init__()
        self.sublayer = sublayer

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return self.sublayer(x)


class PreNorm(nn.Module):
    """y = x + F(LN(x)): the identity path is never normalised."""

    def __init__(self, sublayer: nn.Module, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.norm = sublayer, nn.LayerNorm(width, dtype=dtype)

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return x + self.sublayer(self.norm(x))


class PostNorm(nn.Module):
    """y = LN(x + F(x)): the original Transformer's `O = LayerNorm(X + SelfAttention(X))`."""

    def __init__(self, sublayer: nn.Module, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.norm = sublayer, nn.LayerNorm(width, dtype=dtype)

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return self.norm(x + self.sublayer(x))


class Highway(nn.Module):
    """y = T(x) * F(x) + (1 - T(x)) * x with T(x) = sigmoid(W_T x + b_T), b_T = `GATE_BIAS` at init."""

    def __init__(self, sublayer: nn.Module, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.gate = sublayer, nn.Linear(width, width, dtype=dtype)
        nn.init.constant_(self.gate.bias, GATE_BIAS)

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        transform = torch.sigmoid(self.gate(x))
        return transform * self.sublayer(x) + (1 - transform) * x


class ReZero(nn.Module):
    """y = x + a * F(x), a scalar a = 0 at init: every block starts as the identity."""

    def __init__(self, sublayer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.alpha = sublayer, nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return x + self.alpha * self.sublayer(x)


class Dense(nn.Module):
    """DenseFormer: y = a_self * (x + F(LN(x))) + sum_j a_j history[j], a_self = 1 and a = 0 at init.

    `index` is this connection's position: it reads `index + 1` earlier states (history[0..index]).
    """

    def __init__(self, sublayer: nn.Module, width: int, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.norm = sublayer, nn.LayerNorm(width, dtype=dtype)
        self.self_weight = nn.Parameter(torch.ones((), dtype=dtype))
        self.weights = nn.Parameter(torch.zeros(index + 1, dtype=dtype))

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        out = self.self_weight * (x + self.sublayer(self.norm(x)))
        for weight, state in zip(self.weights, history):
            out = out + weight * state
        return out


class Concat(nn.Module):
    """DenseNet-style: y = F(LN(P concat(history))), P: [(index + 1) * width] -> [width]."""

    def __init__(self, sublayer: nn.Module, width: int, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.sublayer, self.norm = sublayer, nn.LayerNorm(width, dtype=dtype)
        self.project = nn.Linear((index + 1) * width, width, dtype=dtype)

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return self.sublayer(self.norm(self.project(torch.cat(history, dim=-1))))


def connect(variant: str, sublayer: nn.Module, width: int, index: int, dtype: torch.dtype) -> nn.Module:
    """The connection `variant` around `sublayer`, the `index`-th of its stack (0-based)."""
    if variant == "plain":
        return Plain(sublayer)
    if variant in ("pre_norm", "post_norm", "highway"):
        return {"pre_norm": PreNorm, "post_norm": PostNorm, "highway": Highway}[variant](sublayer, width, dtype)
    if variant == "rezero":
        return ReZero(sublayer, dtype)
    if variant in ("dense", "concat"):
        return (Dense if variant == "dense" else Concat)(sublayer, width, index, dtype)
    raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")


class Stack(nn.Module):
    """`connections` applied in order to a stream [..., width]; blocks of `per_block` connections.

    The stream entering block b is the input of connection `b * per_block`; `forward` appends it to
    `streams` (for gradient measurements). Deleting block b (`lesioned`) makes all its connections
    the identity: its output is its input.
    """

    def __init__(self, connections: list[nn.Module], per_block: int = 1) -> None:
        super().__init__()
        self.connections, self.per_block = nn.ModuleList(connections), per_block

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.connections) // self.per_block

    def forward(self, x: torch.Tensor, streams: list[torch.Tensor] | None = None,
                lesioned: frozenset[int] = frozenset()) -> torch.Tensor:
        history = [x]
        for index, connection in enumerate(self.connections):
            block = index // self.per_block
            if streams is not None and index % self.per_block == 0:
                streams.append(x)
            if block not in lesioned:
                x = connection(x, history)
            history.append(x)
        return x
