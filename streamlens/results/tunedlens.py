"""The tuned lens (a trained translator per layer) and the logit-vs-tuned lens comparison."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from streamlens.results.base import Provenance, Result, frame
from streamlens.stats import bootstrap_indices, percentile_interval

if TYPE_CHECKING:
    import pandas as pd

LENSES = ("logit lens", "tuned lens")


@dataclass(frozen=True)
class TunedLens(Result):
    """One affine translator per stage before the last: stream -> stream + stream @ weight[s] + bias[s].

    Stage 0 is the stream after the embeddings, stage s the stream after block s - 1; the stream
    after the last block is the model's own output and is read as it is. With weight and bias zero
    (`identity`) the tuned lens is exactly the logit lens. Shapes: weight [stage, d_model, d_model],
    bias [stage, d_model], train_loss [step] (sum over stages of the mean KL(final || lens), nats).
    """

    provenance: Provenance
    weight: Float[torch.Tensor, "stage d_model d_model"]
    bias: Float[torch.Tensor, "stage d_model"]
    layer_labels: tuple[str, ...]
    steps: int
    lr: float
    batch_tokens: int
    seed: int
    text: str
    n_tokens: int
    seconds: float
    threads: int
    train_loss: Float[torch.Tensor, "step"]
    data: str = ""
    """The --data it was trained on ("builtin", a file path or a literal text)."""
    window: int = 0
    hold_out_every: int = 0
    """0: the data was used whole for training (no held-out texts)."""
    train_texts: tuple[str, ...] = ()
    """sha256 of each training text (utf-8); `lens eval` refuses texts among them."""
    held_out_texts: tuple[str, ...] = ()
    """sha256 of each held-out text: what `lens eval` reads by default."""
    sha256: str = ""
    """Checksum of every other field and tensor, set by `save` and checked by `load`."""

    def content_hash(self) -> str:
        """sha256 over every tensor (name, dtype, shape, bytes) and every other field (JSON), `sha256` excluded."""
        import hashlib
        import json
        from dataclasses import asdict, fields

        digest = hashlib.sha256()
        plain = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                tensor = value.detach().to("cpu").contiguous()
                digest.update(f"{item.name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            elif item.name != "sha256":
                plain[item.name] = asdict(value) if item.name == "provenance" else value
        digest.update(json.dumps(plain, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path):  # type: ignore[override]
        """Write the lens with its checksum (`content_hash`) inside; see `Result.save`."""
        from dataclasses import replace

        return Result.save(replace(self, sha256=self.content_hash()), path)

    @classmethod
    def load(cls, path):  # type: ignore[override]
        """Read a lens and check its checksum: a damaged file (one flipped byte) raises ValueError."""
        lens = super().load(path)
        if not lens.sha256:
            raise ValueError(f"{path} has no checksum (written by an older streamlens): train the lens again")
        if lens.content_hash() != lens.sha256:
            raise ValueError(f"{path} is damaged: its contents do not match the checksum written with them")
        return lens

    @staticmethod
    def identity(provenance: Provenance, n_layers: int, d_model: int, dtype: torch.dtype = torch.float32) -> "TunedLens":
        """The untrained lens (every translator the identity): it reads exactly what the logit lens reads."""
        return TunedLens(provenance, torch.zeros(n_layers, d_model, d_model, dtype=dtype),
                         torch.zeros(n_layers, d_model, dtype=dtype),
                         ("embed", *(str(layer) for layer in range(n_layers))), 0, 0.0, 0, 0, "", 0, 0.0, 0,
                         torch.zeros(0))

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    def translate(self, stage: int, stream: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """The stream at `stage` (0 = embeddings, n_layers = after the last block) moved towards the final one."""
        if stage >= self.n_layers:
            return stream
        weight = self.weight[stage].to(stream.device, stream.dtype)
        return stream + stream @ weight + self.bias[stage].to(stream.device, stream.dtype)

    def to_dataframe(self) -> "pd.DataFrame":
        """Per stage: the size of the learned change (Frobenius norm of weight, norm of bias)."""
        return frame([{"stage": label, "weight_norm": float(self.weight[s].norm()), "bias_norm": float(self.bias[s].norm())}
                      for s, label in enumerate(self.layer_labels[: self.n_layers])])


@dataclass(frozen=True)
class LensComparison(Result):
    """Logit lens and tuned lens read on the same held-out tokens.

    Shapes: kl, rank [lens, stage, window, pos]: KL(final || lens) in nats and the rank (0 = top) of
    the model's final top-1 token under the lens; text_of [window] (the text of each window). lens 0
    is the logit lens, 1 the tuned lens; stage 0 = embeddings, stage s = after block s - 1.
    """

    provenance: Provenance
    lenses: tuple[str, ...]
    layer_labels: tuple[str, ...]
    kl: Float[torch.Tensor, "lens stage window pos"]
    rank: Float[torch.Tensor, "lens stage window pos"]
    text_of: torch.Tensor
    text: str
    text_hashes: tuple[str, ...] = ()
    """sha256 of each text read (utf-8), in the order of their indices in `text_of`."""

    def mean_kl(self) -> Float[torch.Tensor, "lens stage"]:
        return self.kl.mean((-1, -2))

    def mean_rank(self) -> Float[torch.Tensor, "lens stage"]:
        return self.rank.double().mean((-1, -2))

    def top1(self) -> Float[torch.Tensor, "lens stage"]:
        """Share of positions where the lens's top token is the model's final top token."""
        return (self.rank == 0).double().mean((-1, -2))

    def kl_interval(self, n_boot: int = 1000, seed: int = 0) -> Float[torch.Tensor, "2 lens stage"]:
        """95% bootstrap interval of the mean KL, resampling texts (each text's tokens weighted equally)."""
        texts = self.text_of.unique()
        per_text = torch.stack([self.kl[:, :, self.text_of == t].mean((-1, -2)) for t in texts], -1)  # [lens, stage, text]
        boots = per_text[..., bootstrap_indices(len(texts), n_boot, seed)].mean(-1)  # [lens, stage, boot]
        return torch.stack(percentile_interval(boots))

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (lens, stage): mean KL with its 95% interval, mean rank and top-1 agreement."""
        kl, rank, top1, interval = self.mean_kl(), self.mean_rank(), self.top1(), self.kl_interval()
        return frame([{"lens": lens, "stage": label, "mean_kl": float(kl[k, s]), "kl_low": float(interval[0, k, s]),
                       "kl_high": float(interval[1, k, s]), "mean_rank": float(rank[k, s]), "top1": float(top1[k, s]),
                       "n_tokens": self.kl[0, 0].numel()}
                      for k, lens in enumerate(self.lenses) for s, label in enumerate(self.layer_labels)])
