"""Frozen result objects: tensors plus the labels and provenance that explain them.

Every analysis returns one of these. Each can `save(path)` (tensors to safetensors, everything else
to the file's JSON metadata), be read back with `load(path)`, and give a tidy long-format
`to_dataframe()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    import pandas as pd

    from streamlens.model import Model

R = TypeVar("R", bound="Result")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: enough to reproduce it."""

    model: str
    weights_hash: str
    dtype: str
    device: str
    command: str
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @staticmethod
    def of(model: "Model", command: str, seed: int | None = None) -> "Provenance":
        versions = {p: _version(p) for p in ("streamlens", "torch", "transformer-lens", "transformers")}
        versions["python"] = platform.python_version()
        return Provenance(
            model=model.info.name,
            weights_hash=model.info.weights_hash,
            dtype=model.info.dtype,
            device=model.info.device,
            command=command,
            seed=seed,
            versions=versions,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )


def command_line() -> str:
    """The command that is running, for provenance."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


@dataclass(frozen=True)
class Result:
    """Base class: save/load for frozen dataclasses of tensors and JSON-able fields."""

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to `path` (safetensors); atomic: a failed write leaves no file behind."""
        from safetensors.torch import save_file

        target = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                tensors[item.name] = value.detach().to("cpu").contiguous()
            elif value is None:
                plain[item.name] = None
            elif dataclasses.is_dataclass(value):
                plain[item.name] = dataclasses.asdict(value)
            else:
                plain[item.name] = value
        header = {"class": type(self).__name__, "fields": json.dumps(plain)}
        tmp = target.with_name(target.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if header.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a {header.get('class')}, not a {cls.__name__}")
        plain = json.loads(header["fields"])
        kwargs: dict[str, Any] = {}
        for item in fields(cls):
            if item.name in tensors:
                kwargs[item.name] = tensors[item.name]
            elif item.name == "provenance":
                kwargs[item.name] = Provenance(**plain[item.name])
            else:
                value = plain.get(item.name)
                kwargs[item.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dataframe(self) -> "pd.DataFrame":  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def frame(rows: list[dict[str, Any]]) -> "pd.DataFrame":
    import pandas as pd

    table = pd.DataFrame(rows)
    for column in ("layer", "head"):  # integer labels with gaps (None) stay integers
        if column in table and table[column].dtype.kind == "f":
            table[column] = table[column].astype("Int64")
    return table


@dataclass(frozen=True)
class Components:
    """A stack of stream components with their labels (not saved; derived from `StreamWrites`).

    `stack` is [component, batch, pos, d_model]; `labels`, `kinds`, `layers`, `heads` name each row.
    """

    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    stack: torch.Tensor


@dataclass(frozen=True)
class StreamWrites(Result):
    """Every write into the residual stream for one batch of tokens.

    Shapes: tokens [batch, pos]; embed, pos_embed, final [batch, pos, d_model];
    attn, mlp [layer, batch, pos, d_model]; heads [layer, batch, pos, head, d_model] (optional);
    attn_bias [layer, d_model]; final_scale [batch, pos, 1]; logits [batch, pos, d_vocab].
    Identity: embed + pos_embed + attn.sum(0) + mlp.sum(0) == final, and for each layer
    heads[L].sum(head) + attn_bias[L] == attn[L].
    """

    provenance: Provenance
    tokens: torch.Tensor
    token_strings: tuple[str, ...]
    embed: torch.Tensor
    pos_embed: torch.Tensor | None
    attn: torch.Tensor
    mlp: torch.Tensor
    heads: torch.Tensor | None
    attn_bias: torch.Tensor
    final: torch.Tensor
    final_scale: torch.Tensor
    logits: torch.Tensor
    norm: str

    @property
    def n_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def embedding(self) -> torch.Tensor:
        """Token plus positional embedding: the stream entering block 0, [batch, pos, d_model]."""
        return self.embed if self.pos_embed is None else self.embed + self.pos_embed

    def stream(self, after_layer: int | None) -> torch.Tensor:
        """The stream after block `after_layer` (None: before block 0), [batch, pos, d_model]."""
        if after_layer is None:
            return self.embedding
        return self.embedding + self.attn[: after_layer + 1].sum(0) + self.mlp[: after_layer + 1].sum(0)

    def identity_error(self) -> float:
        """max |embed + sum of writes - final|: zero up to rounding when the record is complete."""
        return float((self.stream(self.n_layers - 1) - self.final).abs().max())

    def components(self, by_head: bool = False) -> Components:
        """Writes in stream order: embed, (pos_embed), then per layer attn (or heads + bias), mlp."""
        labels, kinds, layers, heads, rows = ["embed"], ["embed"], [None], [None], [self.embed]
        if self.pos_embed is not None:
            labels.append("pos_embed"), kinds.append("pos_embed"), layers.append(None), heads.append(None)
            rows.append(self.pos_embed)
        if by_head and self.heads is None:
            raise ValueError("these writes were recorded without heads: use record(..., heads=True)")
        for layer in range(self.n_layers):
            if by_head:
                assert self.heads is not None
                for head in range(self.heads.shape[3]):
                    labels.append(f"L{layer}H{head}"), kinds.append("head"), layers.append(layer)
                    heads.append(head), rows.append(self.heads[layer, :, :, head])
                labels.append(f"attn bias {layer}"), kinds.append("attn_bias"), layers.append(layer)
                heads.append(None), rows.append(self.attn_bias[layer].expand_as(self.embed))
            else:
                labels.append(f"attn {layer}"), kinds.append("attn"), layers.append(layer), heads.append(None)
                rows.append(self.attn[layer])
            labels.append(f"mlp {layer}"), kinds.append("mlp"), layers.append(layer), heads.append(None)
            rows.append(self.mlp[layer])
        return Components(tuple(labels), tuple(kinds), tuple(layers), tuple(heads), torch.stack(rows))

    def to_dataframe(self) -> "pd.DataFrame":
        """Per (component, batch, pos): norm of the write, its cosine with the final stream, and
        the norm of the stream after it is added."""
        comps = self.components()
        norms = comps.stack.norm(dim=-1)
        cosines = torch.nn.functional.cosine_similarity(comps.stack, self.final.unsqueeze(0), dim=-1)
        running = comps.stack.cumsum(0).norm(dim=-1)
        rows = []
        for index, label in enumerate(comps.labels):
            for batch in range(self.tokens.shape[0]):
                for pos in range(self.tokens.shape[1]):
                    rows.append(
                        {
                            "component": label,
                            "kind": comps.kinds[index],
                            "layer": comps.layers[index],
                            "batch": batch,
                            "pos": pos,
                            "write_norm": float(norms[index, batch, pos]),
                            "cos_with_final": float(cosines[index, batch, pos]),
                            "stream_norm_after": float(running[index, batch, pos]),
                        }
                    )
        return frame(rows)


@dataclass(frozen=True)
class LogitDecomposition(Result):
    """Contributions of each stream component to target logits at chosen positions.

    Shapes: contributions [component, n_pos, n_targets]; logits [n_pos, n_targets] (the model's real
    logit, or logit difference when a contrast token is set); accumulated [n_layers + 1, n_pos,
    n_targets] (row 0: embeddings; row L + 1: after block L; bias terms excluded); scale [n_pos] (the
    frozen final-norm scale). Identity: contributions.sum(0) == logits.
    """

    provenance: Provenance
    tokens: torch.Tensor
    token_strings: tuple[str, ...]
    positions: tuple[int, ...]
    target_ids: torch.Tensor
    contrast_ids: torch.Tensor
    target_strings: tuple[list[str], ...]
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    contributions: torch.Tensor
    logits: torch.Tensor
    accumulated: torch.Tensor
    scale: torch.Tensor
    norm: str

    @property
    def total(self) -> torch.Tensor:
        """Sum of all contributions, [n_pos, n_targets]."""
        return self.contributions.sum(0)

    @property
    def error(self) -> float:
        """max |sum of contributions - real logit|."""
        return float((self.total - self.logits).abs().max())

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (position, target, component)."""
        rows = []
        for p_index, position in enumerate(self.positions):
            for t_index, target in enumerate(self.target_strings[p_index]):
                for c_index, label in enumerate(self.labels):
                    rows.append(
                        {
                            "position": position,
                            "token": self.token_strings[position],
                            "target": target,
                            "component": label,
                            "kind": self.kinds[c_index],
                            "layer": self.layers[c_index],
                            "head": self.heads[c_index],
                            "contribution": float(self.contributions[c_index, p_index, t_index]),
                            "logit": float(self.logits[p_index, t_index]),
                        }
                    )
        return frame(rows)


@dataclass(frozen=True)
class LogitLens(Result):
    """The final norm and unembedding applied to the stream after the embeddings and every block.

    Shapes (stage = embeddings, then after each block; n_stages = n_layers + 1): top_ids, top_probs
    [stage, pos, k]; target_ids [pos] (text in target_strings); target_probs, target_ranks (0 = top), kl_to_final (nats,
    KL(final || lens)) [stage, pos]. The last stage is the model's own output.
    """

    provenance: Provenance
    tokens: torch.Tensor
    token_strings: tuple[str, ...]
    layer_labels: tuple[str, ...]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_strings: tuple[list[list[str]], ...]
    target_ids: torch.Tensor
    target_strings: tuple[str, ...]
    target_probs: torch.Tensor
    target_ranks: torch.Tensor
    kl_to_final: torch.Tensor

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (stage, position)."""
        rows = []
        for stage, layer in enumerate(self.layer_labels):
            for position, token in enumerate(self.token_strings):
                rows.append(
                    {
                        "layer": layer,
                        "position": position,
                        "token": token,
                        "target_id": int(self.target_ids[position]),
                        "target": self.target_strings[position],
                        "target_prob": float(self.target_probs[stage, position]),
                        "target_rank": int(self.target_ranks[stage, position]),
                        "kl_to_final": float(self.kl_to_final[stage, position]),
                        "top1": self.top_strings[stage][position][0],
                        "top1_prob": float(self.top_probs[stage, position, 0]),
                    }
                )
        return frame(rows)


# ----- ablation (issue 4) -----------------------------------------------------------------------
def _damage_rows(result: Any, labels: dict[str, tuple]) -> list[dict[str, Any]]:
    rows = []
    for index in range(result.values.shape[0]):
        for column, name in enumerate(result.metrics):
            row = {key: values[index] for key, values in labels.items()}
            row.update(metric=name, value=float(result.values[index, column]),
                       ci_low=float(result.ci_low[index, column]), ci_high=float(result.ci_high[index, column]))
            rows.append(row)
    return rows


@dataclass(frozen=True)
class AblationResult(Result):
    """Damage done by removing each unit (or set of units), with 95% bootstrap CIs.

    Shapes: values, ci_low, ci_high [unit, metric]; per_text [unit, metric, text]; clean_loss [text]
    (the clean model's mean next-token loss per text, for scale). `values` is the mean over texts
    of `per_text`; the CIs resample texts (windows or prompts) with replacement, `n_boot` times,
    seeded by `provenance.seed`. Metric names and units: `streamlens.metrics`.
    """

    provenance: Provenance
    units: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    methods: tuple[str, ...]
    effects: tuple[str, ...]
    metrics: tuple[str, ...]
    values: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    per_text: torch.Tensor
    clean_loss: torch.Tensor
    data: str
    n_texts: int
    n_predictions: int
    n_boot: int
    seconds: float

    def value(self, unit: str, metric: str = "loss_increase") -> float:
        """The point estimate of one metric for one unit (by label, e.g. "block 3")."""
        if unit not in self.units:
            raise ValueError(f"unknown unit {unit!r}: this result has {', '.join(self.units)}")
        if metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}: this result has {', '.join(self.metrics)}")
        return float(self.values[self.units.index(unit), self.metrics.index(metric)])

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (unit, metric): unit, kind, layer, head, method, effect, metric, value, ci_low, ci_high."""
        labels = {"unit": self.units, "kind": self.kinds, "layer": self.layers, "head": self.heads,
                  "method": self.methods, "effect": self.effects}
        return frame(_damage_rows(self, labels))


@dataclass(frozen=True)
class CumulativeAblation(Result):
    """Damage as units are removed one after another; step k (1-based) has units[:k] removed.

    Shapes: values, ci_low, ci_high [step, metric]; per_text [step, metric, text]. `mode` is
    "order" (the given order) or "greedy" (least damaging next). CIs as in `AblationResult`.
    """

    provenance: Provenance
    mode: str
    units: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    method: str
    effect: str
    metrics: tuple[str, ...]
    values: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    per_text: torch.Tensor
    data: str
    n_texts: int
    n_predictions: int
    n_boot: int
    seconds: float

    def to_dataframe(self) -> "pd.DataFrame":
        """One row per (step, metric): n_removed, unit (removed at this step), kind, layer, head,
        method, effect, mode, metric, value, ci_low, ci_high."""
        steps = len(self.units)
        labels = {"n_removed": tuple(range(1, steps + 1)), "unit": self.units,
                  "kind": self.kinds, "layer": self.layers, "head": self.heads, "method": (self.method,) * steps,
                  "effect": (self.effect,) * steps, "mode": (self.mode,) * steps}
        return frame(_damage_rows(self, labels))
