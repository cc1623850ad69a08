"""One training run of one model on one testbed, measured as it trains.

Adam (PyTorch defaults besides the testbed's learning rate), optional linear warm-up, mini-batches in
an order fixed by the seed. Before update t the run records the mini-batch loss; at every eval step
it also records the held-out loss (and accuracy), the gradient norm at the input of every block and
the gradient norm of every block's parameters (Xiong et al. 2020 measure the latter).
One step is also run under `saved_tensors_hooks` to count the activation memory the backward pass
keeps. Everything is deterministic on one CPU thread, except the step times.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from streamlens.highway.testbeds import Testbed


@dataclass(frozen=True)
class RunRecord:
    """What one run measured (E eval steps, depth blocks): train_loss [steps + 1], heldout_loss and
    heldout_accuracy [E] (accuracy NaN without labels), grad_norm and param_grad_norm [E, depth],
    saved_bytes, step_seconds."""

    train_loss: torch.Tensor
    heldout_loss: torch.Tensor
    heldout_accuracy: torch.Tensor
    grad_norm: torch.Tensor
    param_grad_norm: torch.Tensor
    saved_bytes: int
    step_seconds: float


def build_model(testbed: Testbed, variant: str, depth: int, seed: int) -> nn.Module:
    """The testbed's model, with weights that depend only on (seed, depth, variant's place)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + depth)
        return testbed.build(variant, depth)


def stream_gradients(model: nn.Module, testbed: Testbed, inputs: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and ||dloss/dh_b|| (Frobenius, whole batch) at the input h_b of every block: (scalar, [depth]).

    One backward pass; it also accumulates the parameters' `.grad` (the caller zeroes them first).
    """
    streams: list[torch.Tensor] = []
    loss = testbed.loss(model(inputs, streams), targets)
    for stream in streams:
        stream.retain_grad()
    loss.backward()
    return loss.detach(), torch.stack([stream.grad.norm() for stream in streams]).double()


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of each block, [depth]: a stack's connections grouped per block, or the CNN's blocks."""
    if hasattr(model, "stack"):
        stack = model.stack
        return [nn.ModuleList(stack.connections[b * stack.per_block : (b + 1) * stack.per_block])
                for b in range(stack.depth)]
    return list(model.blocks)


def parameter_gradients(model: nn.Module) -> torch.Tensor:
    """||dloss/dtheta_b||: the norm of the `.grad` of all parameters of block b together, [depth] float64.

    Read after a backward pass; a parameter without a gradient counts as zero. The identity:
    sum_b norm_b^2 + (the same for parameters outside the blocks) = the squared norm of all `.grad`.
    """
    norms = []
    for block in block_modules(model):
        squares = [p.grad.double().pow(2).sum() for p in block.parameters() if p.grad is not None]
        norms.append(torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64))
    return torch.stack(norms)


def saved_activation_bytes(model: nn.Module, testbed: Testbed, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for one backward pass, parameters excluded.

    Each storage is counted once however often it is saved (a dense stack saves the same states in
    many weighted sums), by the storage's address and size; deterministic for given shapes.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = testbed.loss(model(inputs), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@torch.no_grad()
def evaluate(model: nn.Module, testbed: Testbed, lesioned: frozenset[int] = frozenset()) -> tuple[float, float]:
    """Held-out loss and accuracy (NaN without labels), model in eval mode, blocks `lesioned` deleted."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(testbed.heldout_x, None, lesioned)
        loss = float(testbed.loss(outputs, testbed.heldout_y))
        accuracy = (float((outputs.argmax(-1) == testbed.heldout_y).double().mean()) if testbed.has_labels
                    else float("nan"))
    finally:
        model.train(was_training)
    return loss, accuracy


def learning_rate(testbed: Testbed, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps (step 0 gets lr / warmup), then constant."""
    return testbed.lr * min(1.0, (step + 1) / warmup) if warmup else testbed.lr


def train_run(model: nn.Module, testbed: Testbed, seed: int, steps: int, eval_steps: tuple[int, ...],
              warmup: int = 0) -> RunRecord:
    """Train `model` for `steps` Adam updates; measure as described in the module docstring."""
    order = torch.Generator().manual_seed(seed + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=testbed.lr)
    first = torch.randint(0, len(testbed.train_x), (testbed.batch,), generator=torch.Generator().manual_seed(seed))
    # on a copy: the extra forward would move batch-norm running statistics
    saved = saved_activation_bytes(copy.deepcopy(model), testbed, testbed.train_x[first], testbed.train_y[first])
    losses, heldout, accuracy, grads, param_grads, seconds, timed = [], [], [], [], [], 0.0, 0
    for step in range(steps + 1):
        rows = torch.randint(0, len(testbed.train_x), (testbed.batch,), generator=order)
        started = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        if step in eval_steps:
            loss, grad_norm = stream_gradients(model, testbed, testbed.train_x[rows], testbed.train_y[rows])
            grads.append(grad_norm), param_grads.append(parameter_gradients(model))
            heldout_loss, heldout_accuracy = evaluate(model, testbed)
            heldout.append(heldout_loss), accuracy.append(heldout_accuracy)
        else:
            loss = testbed.loss(model(testbed.train_x[rows]), testbed.train_y[rows])
            loss.backward()
            loss = loss.detach()
        losses.append(float(loss))
        if step < steps:
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(testbed, step, warmup)
            optimiser.step()
            if step not in eval_steps:  # time plain training steps only, not the measurements
                seconds, timed = seconds + time.perf_counter() - started, timed + 1
    return RunRecord(torch.tensor(losses, dtype=torch.float64), torch.tensor(heldout, dtype=torch.float64),
                     torch.tensor(accuracy, dtype=torch.float64), torch.stack(grads), torch.stack(param_grads), saved,
                     seconds / max(1, timed))
