"""The `Result` base class (save/load/to_dataframe), `Provenance` and the tidy-table helper."""

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


def package_version(package: str) -> str:
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
    bridge_vs_hf: float | None = None
    fidelity: str = ""  # empty: the bridge computed the model's own logits (see ModelInfo.fidelity)
    backend: str = "in-process"  # or e.g. "ray: 2 workers on cpu" (streamlens.ablation.backends)

    @staticmethod
    def of(model: "Model", command: str, seed: int | None = None) -> "Provenance":
        versions = {p: package_version(p) for p in ("streamlens", "torch", "transformer-lens", "transformers")}
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
            bridge_vs_hf=getattr(model.info, "bridge_vs_hf", None),
            fidelity=getattr(model.info, "fidelity", ""),
        )


def command_line() -> str:
    """The command that is running, for provenance: shell-quoted, so pasting it runs exactly that command."""
    import shlex

    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


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
            elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                for index, tensor in enumerate(value):  # e.g. one weight per layer
                    tensors[f"{item.name}.{index}"] = tensor.detach().to("cpu").contiguous()
                plain[item.name] = {"tensors": len(value)}
            elif value is None:
                plain[item.name] = None
            elif dataclasses.is_dataclass(value):
                plain[item.name] = dataclasses.asdict(value)
            else:
                plain[item.name] = value
        header = {"class": type(self).__name__, "fields": json.dumps(plain, default=_label)}
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
            elif isinstance(plain.get(item.name), dict) and "tensors" in plain[item.name]:
                kwargs[item.name] = tuple(tensors[f"{item.name}.{i}"] for i in range(plain[item.name]["tensors"]))
            else:
                value = plain.get(item.name)
                kwargs[item.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dataframe(self) -> "pd.DataFrame":  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _label(value: Any) -> Any:
    """JSON for values that have a text label (a `Site` is saved as "attn 3"; results parse it back)."""
    if hasattr(value, "label"):
        return value.label
    raise TypeError(f"cannot save {type(value).__name__} {value!r} in a result's JSON fields")


def frame(rows: list[dict[str, Any]]) -> "pd.DataFrame":
    import pandas as pd

    table = pd.DataFrame(rows)
    for column in ("layer", "head"):  # integer labels with gaps (None) stay integers
        if column in table and table[column].dtype.kind == "f":
            table[column] = table[column].astype("Int64")
    return table
