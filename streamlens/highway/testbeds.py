"""Three offline testbeds for the residual family, each a data set plus a model builder.

- `mlp`: the toy teacher task of `streamlens.highway.toy` (inputs x ~ N(0, I) in 16 dimensions,
  standardised targets: loss 1.0 is predicting the mean); model `readout(LN(stack(embed(x))))` with
  the toy block `F(h) = W2 relu(W1 h + b1) + b2` (width 32, PyTorch's default init) in every
  connection; float64.
- `lm`: a character-level Transformer language model trained on the built-in texts (`data/texts`:
  the last 15% of every text is held out); block = attention sublayer + MLP sublayer, each wrapped by
  the variant; width 32, 2 heads, context 32, learnt positions, final LayerNorm, float32.
- `cnn`: scikit-learn's 8x8 digits (1,797 images, 10 classes; a fixed 20% held out); the ResNet basic
  block of He et al. 2016 (two 3x3 convolutions with batch norm; a 1x1 projection shortcut with batch
  norm where the shape changes), residual or plain (the same block without its shortcut); two stages
  (16 channels at 8x8, 32 at 4x4), global average pooling, a linear classifier; float32.

Every model has `depth`, `lesionable` (the blocks that can be deleted at test time: those whose
input and output shapes agree) and `forward(inputs, streams=None, lesioned=frozenset())`; `streams`
collects the tensor entering each block, for gradient norms. The data are the same for every seed;
the seed sets the weights and the batch order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import einops
import torch
import torch.nn.functional as F
from torch import nn

from streamlens.highway.toy import Block as ToyBlock
from streamlens.highway.toy import teacher_task
from streamlens.highway.variants import Stack, connect
from streamlens.results.highway import ToyConfig
from streamlens.results.residuals import CNN_VARIANTS

SKLEARN_HINT = "the digits testbed needs scikit-learn: pip install 'streamlens[residuals]' (or scikit-learn)"


@dataclass(frozen=True)
class Testbed:
    """A data set, a model builder and the loss: everything a training run needs.

    `train_x`/`train_y` and `heldout_x`/`heldout_y` hold the examples (first dimension: example);
    `build(variant, depth)` makes a model (call it inside a seeded context); `loss(outputs, targets)`
    is a scalar mean; `has_labels`: accuracy is defined (argmax of the last dimension).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    build: Callable[[str, int], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    has_labels: bool
    lr: float
    batch: int
    dtype: torch.dtype


# ----- (a) the toy MLP ----------------------------------------------------------------------------
MLP_WIDTH, MLP_D_IN = 32, 16


class MLPModel(nn.Module):
    """[batch, d_in] -> [batch]: readout(LN(stack(embed(x))))."""

    def __init__(self, variant: str, depth: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = nn.Linear(MLP_D_IN, MLP_WIDTH, dtype=dtype)
        self.stack = Stack([connect(variant, ToyBlock(MLP_WIDTH, "none", "torch").to(dtype), MLP_WIDTH, i, dtype)
                            for i in range(depth)])
        self.final_norm = nn.LayerNorm(MLP_WIDTH, dtype=dtype)
        self.readout = nn.Linear(MLP_WIDTH, 1, dtype=dtype)
        self.depth, self.lesionable = depth, tuple(range(depth))

    def forward(self, x, streams=None, lesioned=frozenset()):
        return self.readout(self.final_norm(self.stack(self.embed(x), streams, lesioned))).squeeze(-1)


def mlp_testbed() -> Testbed:
    """The toy teacher task: 2,048 training and 512 held-out examples from one fixed teacher."""
    x, y = teacher_task(ToyConfig(n_train=2048 + 512, d_in=MLP_D_IN, seed=0))
    return Testbed("mlp", x[:2048], y[:2048], x[2048:], y[2048:], lambda v, d: MLPModel(v, d),
                   lambda out, target: (out - target).pow(2).mean(), False, 1e-3, 64, torch.float64)


# ----- (b) the character Transformer --------------------------------------------------------------
LM_WIDTH, LM_HEADS, LM_CONTEXT = 32, 2, 32


class Attention(nn.Module):
    """Causal multi-head self-attention, [batch, pos, width] -> [batch, pos, width]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "b p (three h d) -> three b h p d", three=3, h=self.heads)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(einops.rearrange(mixed, "b h p d -> b p (h d)"))


def mlp_sublayer(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class CharLM(nn.Module):
    """[batch, pos] character ids -> [batch, pos, vocab] logits; block b = connections 2b (attn), 2b+1 (MLP)."""

    def __init__(self, variant: str, depth: int, vocab: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, LM_WIDTH), nn.Parameter(torch.randn(LM_CONTEXT, LM_WIDTH))
        sublayers = [Attention(LM_WIDTH, LM_HEADS) if i % 2 == 0 else mlp_sublayer(LM_WIDTH) for i in range(2 * depth)]
        self.stack = Stack([connect(variant, s, LM_WIDTH, i, torch.float32) for i, s in enumerate(sublayers)], 2)
        self.final_norm, self.unembed = nn.LayerNorm(LM_WIDTH), nn.Linear(LM_WIDTH, vocab)
        self.depth, self.lesionable = depth, tuple(range(depth))

    def forward(self, ids, streams=None, lesioned=frozenset()):
        stream = self.embed(ids) + self.position[: ids.shape[-1]]
        return self.unembed(self.final_norm(self.stack(stream, streams, lesioned)))


def char_windows(texts: list[str], vocab: dict[str, int], stride: int) -> torch.Tensor:
    """Windows of LM_CONTEXT + 1 character ids from each text, every `stride` characters, [window, 33]."""
    windows = []
    for text in texts:
        ids = torch.tensor([vocab[c] for c in text])
        for start in range(0, len(ids) - LM_CONTEXT, stride):
            windows.append(ids[start : start + LM_CONTEXT + 1])
    return torch.stack(windows)


def lm_testbed() -> Testbed:
    """Characters of the built-in texts: training windows (stride 1) from the first 85% of each text,
    held-out windows (stride 8) from the last 15%. Loss: mean next-character cross-entropy (nats)."""
    from streamlens.data import load_texts

    texts = load_texts(None)
    vocab = {c: i for i, c in enumerate(sorted(set("".join(texts))))}
    cut = [round(0.85 * len(text)) for text in texts]
    train = char_windows([t[:c] for t, c in zip(texts, cut)], vocab, 1)
    heldout = char_windows([t[c:] for t, c in zip(texts, cut)], vocab, 8)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(einops.rearrange(logits, "b p v -> (b p) v"), einops.rearrange(targets, "b p -> (b p)"))

    return Testbed("lm", train[:, :-1], train[:, 1:], heldout[:, :-1], heldout[:, 1:],
                   lambda v, d: CharLM(v, d, len(vocab)), loss, True, 3e-3, 16, torch.float32)


# ----- (c) the ResNet basic block on 8x8 digits ---------------------------------------------------
CNN_CHANNELS = 16


class BasicBlock(nn.Module):
    """He et al. 2016: relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); plain: without the shortcut.

    The shortcut is the identity, or conv1x1 + BN (the projection) where stride or channels change.
    [batch, c_in, h, w] -> [batch, c_out, h / stride, w / stride].
    """

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.residual, self.keeps_shape = residual, stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if self.keeps_shape else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x) if self.residual else out)


class DigitsCNN(nn.Module):
    """[batch, 1, 8, 8] -> [batch, 10] logits: stem, ceil(depth/2) blocks at 16 channels 8x8, the rest
    at 32 channels 4x4 (the first of them strided, with the projection shortcut), pooling, linear."""

    def __init__(self, variant: str, depth: int) -> None:
        super().__init__()
        if variant not in CNN_VARIANTS:
            raise ValueError(f"unknown digits variant {variant!r}: choose from {', '.join(CNN_VARIANTS)}")
        residual, first = variant == "residual", math.ceil(depth / 2)
        self.stem = nn.Sequential(nn.Conv2d(1, CNN_CHANNELS, 3, 1, 1, bias=False), nn.BatchNorm2d(CNN_CHANNELS),
                                  nn.ReLU())
        shapes = [(CNN_CHANNELS, CNN_CHANNELS, 1)] * first
        shapes += [(CNN_CHANNELS if i == 0 else 2 * CNN_CHANNELS, 2 * CNN_CHANNELS, 2 if i == 0 else 1)
                   for i in range(depth - first)]
        self.blocks = nn.ModuleList(BasicBlock(c_in, c_out, stride, residual) for c_in, c_out, stride in shapes)
        self.classify = nn.Linear(shapes[-1][1], 10)
        self.depth = depth
        self.lesionable = tuple(b for b, block in enumerate(self.blocks) if block.keeps_shape)

    def forward(self, images, streams=None, lesioned=frozenset()):
        x = self.stem(images)
        for b, block in enumerate(self.blocks):
            if streams is not None:
                streams.append(x)
            if b not in lesioned:
                x = block(x)
        return self.classify(einops.reduce(x, "b c h w -> b c", "mean"))


def cnn_testbed() -> Testbed:
    """The 8x8 digits, pixels scaled to [0, 1] and standardised with the training set's mean and std;
    a fixed permutation (seed 0) holds out 20%."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(SKLEARN_HINT) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_heldout = len(labels) // 5
    train, heldout = order[n_heldout:], order[:n_heldout]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Testbed("cnn", images[train], labels[train], images[heldout], labels[heldout],
                   lambda v, d: DigitsCNN(v, d), F.cross_entropy, True, 3e-3, 32, torch.float32)


TESTBED_BUILDERS = {"mlp": mlp_testbed, "lm": lm_testbed, "cnn": cnn_testbed}


def load_testbed(name: str) -> Testbed:
    """One testbed by name (mlp, lm, cnn)."""
    if name not in TESTBED_BUILDERS:
        raise ValueError(f"unknown testbed {name!r}: choose from {', '.join(TESTBED_BUILDERS)}")
    return TESTBED_BUILDERS[name]()
