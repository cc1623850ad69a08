"""Toy stacks: why `y = x + F(x)` trains at depths where `y = F(x)` does not.

A *plain* stack applies blocks one after the other, `h <- F_l(h)`; a *residual* stack adds each
block's output to its input, `h <- h + F_l(h)`. The block is the same in both:

    F(h) = W2 relu(W1 norm(h) + b1) + b2        (norm: identity, or LayerNorm with `norm="layer"`)

By the chain rule the gradient reaching the input of block l is the product of the block Jacobians
above it. For the plain stack that is `prod dF/dh`, which shrinks or grows exponentially with depth;
for the residual stack it is `prod (I + dF/dh)`, which keeps the identity term: the gradient has a
path to every layer that no block can block (the "gradient highway"). With `F = 0` a residual stack
is exactly the identity, so adding blocks can never make the best reachable loss worse.

The task: regress a fixed random teacher network (inputs x ~ N(0, I), targets standardised to mean 0
and variance 1, so a loss of 1.0 is "no better than predicting the mean"). A stack is
`readout(final_norm(blocks(embed(x))))`. Plain and residual stacks of the same depth start from the
SAME weights and see the same mini-batches in the same order: the skip is the only difference.
Initialisation: PyTorch's default `nn.Linear` init (`init="torch"`: U(+-1/sqrt(fan_in)) for weights
and biases) or He init (`init="he"`: N(0, 2/fan_in) for W1, N(0, 1/fan_in) for W2, zero biases).
Optimiser: Adam with the same learning rate for both kinds. Everything is float64 (no underflow of the
tiny gradients of deep plain stacks) on one CPU thread (tiny matrices: threads only add overhead, and
one thread makes the numbers identical on every machine for a given seed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from streamlens.results import Provenance, command_line, package_version
from streamlens.results.highway import ToyConfig, ToyHighway

if TYPE_CHECKING:
    import pandas as pd

Kind = Literal["plain", "residual"]
KINDS: tuple[Kind, ...] = ("plain", "residual")
DTYPE = torch.float64
D_TEACHER = 64  # hidden width of the teacher network


# ----- the network ------------------------------------------------------------------------------
class Block(nn.Module):
    """F(h) = W2 relu(W1 norm(h) + b1) + b2, [batch, width] -> [batch, width]."""

    def __init__(self, width: int, norm: str, init: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, dtype=DTYPE) if norm == "layer" else nn.Identity()
        self.W1 = nn.Linear(width, width, dtype=DTYPE)
        self.W2 = nn.Linear(width, width, dtype=DTYPE)
        if init == "he":
            nn.init.kaiming_normal_(self.W1.weight, nonlinearity="relu")
            nn.init.kaiming_normal_(self.W2.weight, nonlinearity="linear")
            nn.init.zeros_(self.W1.bias), nn.init.zeros_(self.W2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.W2(torch.relu(self.W1(self.norm(h))))


class Stack(nn.Module):
    """embed -> `depth` blocks (plain: h <- F(h); residual: h <- h + F(h)) -> final norm -> readout."""

    def __init__(self, d_in: int, width: int, depth: int, kind: Kind, norm: str = "none", init: str = "torch") -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(d_in, width, dtype=DTYPE)
        self.blocks = nn.ModuleList(Block(width, norm, init) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, dtype=DTYPE) if norm == "layer" else nn.Identity()
        self.readout = nn.Linear(width, 1, dtype=DTYPE)

    def body(self, h: torch.Tensor, streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The blocks alone, [batch, width] -> [batch, width]; appends each block's input to `streams`."""
        for block in self.blocks:
            if streams is not None:
                streams.append(h)
            h = h + block(h) if self.kind == "residual" else block(h)
        return h

    def forward(self, x: torch.Tensor, streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Prediction [batch] for inputs [batch, d_in]."""
        return self.readout(self.final_norm(self.body(self.embed(x), streams))).squeeze(-1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread (tiny tensors: threads only add overhead; one thread makes runs bit-equal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_stack(config: ToyConfig, depth: int, kind: Kind) -> Stack:
    """A stack whose weights depend only on (seed, depth): plain and residual start identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 100_003 + depth)
        return Stack(config.d_in, config.width, depth, kind, config.norm, config.init)


def teacher_task(config: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training set: x [n_train, d_in] ~ N(0, I), y [n_train] = standardised tanh teacher of x."""
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.n_train, config.d_in, generator=generator, dtype=DTYPE)
    W1 = torch.randn(config.d_in, D_TEACHER, generator=generator, dtype=DTYPE) / math.sqrt(config.d_in)
    W2 = torch.randn(D_TEACHER, D_TEACHER, generator=generator, dtype=DTYPE) / math.sqrt(D_TEACHER)
    w3 = torch.randn(D_TEACHER, generator=generator, dtype=DTYPE) / math.sqrt(D_TEACHER)
    y = torch.tanh(2 * torch.tanh(2 * x @ W1) @ W2) @ w3
    return x, (y - y.mean()) / y.std()


def stream_gradients(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error and the norm of its gradient at each block's input (one backward pass).

    The same backward pass sets the parameters' `.grad` (as `loss.backward()` on zeroed gradients
    would: one `autograd.grad` call for the streams and the parameters, no retained-grad hooks).

    Returns:
        loss (scalar) and grad_norm [depth]: ||dloss/dh_l|| over the whole batch (Frobenius norm),
        where h_l [batch, width] is the input of block l.
    """
    streams: list[torch.Tensor] = []
    loss = (stack(x, streams) - y).pow(2).mean()
    parameters = [parameter for parameter in stack.parameters() if parameter.requires_grad]
    grads = torch.autograd.grad(loss, [*streams, *parameters])
    for parameter, grad in zip(parameters, grads[len(streams):]):
        parameter.grad = grad
    return loss.detach(), torch.stack([grad.norm() for grad in grads[: len(streams)]])


def train_stack(
    stack: Stack, x: torch.Tensor, y: torch.Tensor, config: ToyConfig, on_step: Callable[[], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adam on mini-batches (order fixed by the seed); measure before every update and after the last.

    Returns:
        loss [steps + 1] (mini-batch loss), grad_norm [steps + 1, depth] (row t: before update t; row
        `steps`: after training), final loss on the whole training set.
    """
    # foreach: the same elementwise update as the per-tensor loop (bit-identical), in a few calls per step
    optimiser = torch.optim.Adam(stack.parameters(), lr=config.lr, foreach=True)
    order = torch.Generator().manual_seed(config.seed + 1)
    losses, grad_norms = [], []
    for step in range(config.steps + 1):
        rows = torch.randint(0, x.shape[0], (config.batch,), generator=order)
        optimiser.zero_grad()
        loss, grad_norm = stream_gradients(stack, x[rows], y[rows])
        losses.append(loss), grad_norms.append(grad_norm)
        if step < config.steps:
            optimiser.step()
        if on_step is not None:
            on_step()
    with torch.no_grad():
        final = float((stack(x) - y).pow(2).mean())
    return torch.stack(losses), torch.stack(grad_norms), final


def torch_init_ratio(kind: Kind, depth: int) -> float:
    """Predicted ||grad at block 0|| / ||grad at the last block|| at init, for init="torch", norm="none".

    PyTorch's default `nn.Linear` init draws weights from U(+-1/sqrt(n)): variance 1/(3n). Backwards
    through one block, g -> W1^T (relu' * (W2^T g)): E||W2^T g||^2 = ||g||^2 / 3, the ReLU passes about
    half the coordinates, W1^T another 1/3: a squared gain of 1/18 per block. A residual block adds
    this to the identity path (the cross term has mean zero): 1 + 1/18. Between the inputs of block 0
    and of the last block lie depth - 1 blocks. Approximate: biases shift the ReLU's half.
    """
    gain = 1 / 18 if kind == "plain" else 1 + 1 / 18
    return gain ** ((depth - 1) / 2)


def zero_branch_check(config: ToyConfig, depth: int = 8) -> tuple[float, float]:
    """With W2 = b2 = 0 (so F = 0) a residual stack's blocks are exactly the identity.

    Returns:
        max |body(h) - h| and max |dL/dh_in - dL/dh_out| for L = sum(body(h) * g), g random: both 0.0.
    """
    stack = make_stack(config, depth, "residual")
    with torch.no_grad():
        for block in stack.blocks:
            block.W2.weight.zero_(), block.W2.bias.zero_()
    generator = torch.Generator().manual_seed(config.seed)
    h = torch.randn(config.batch, config.width, generator=generator, dtype=DTYPE, requires_grad=True)
    upstream = torch.randn(config.batch, config.width, generator=generator, dtype=DTYPE)
    out = stack.body(h)
    (grad,) = torch.autograd.grad(out, h, upstream)
    return float((out - h).abs().max().detach()), float((grad - upstream).abs().max())


def toy_highway(
    config: ToyConfig = ToyConfig(),
    on_step: Callable[[str, int], None] | None = None,
    command: str | None = None,
) -> ToyHighway:
    """Train a plain and a residual stack at every depth of `config`; measure gradients and losses.

    Args:
        config: the experiment's settings.
        on_step: called as `on_step(kind, depth)` after every measured step (for progress bars).
    """
    started = time.perf_counter()
    max_depth = max(config.depths)
    shape = (len(KINDS), len(config.depths), config.steps + 1)
    grad_norm = torch.full((*shape, max_depth), float("nan"), dtype=DTYPE)
    loss = torch.zeros(shape, dtype=DTYPE)
    final_loss = torch.zeros(shape[:2], dtype=DTYPE)
    with one_thread():
        x, y = teacher_task(config)
        for d, depth in enumerate(config.depths):
            for k, kind in enumerate(KINDS):
                tick = (lambda kind=kind, depth=depth: on_step(kind, depth)) if on_step else None
                stack = make_stack(config, depth, kind)
                loss[k, d], grad_norm[k, d, :, :depth], final_loss[k, d] = train_stack(stack, x, y, config, tick)
        zero_error, zero_grad_error = zero_branch_check(config)
    versions = {p: package_version(p) for p in ("streamlens", "torch")}
    provenance = Provenance(model="toy MLP stacks", weights_hash="", dtype="float64", device="cpu",
                            command=command or command_line(), seed=config.seed, versions=versions,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return ToyHighway(
        provenance=provenance, kinds=KINDS, **dataclasses.asdict(config),
        grad_norm=grad_norm, loss=loss, final_loss=final_loss, zero_branch_error=zero_error,
        zero_branch_grad_error=zero_grad_error, seconds=time.perf_counter() - started,
    )
