"""Shards and checkpoints: how one call of the engine is cut into shards, and where finished shards
are kept so that a run killed at any moment (SIGKILL included) resumes where it stopped.

A shard is a few whole groups of specs (those that share forwards, `Engine.groups`) x one chunk of
`batch_size` texts, planned chunk by chunk. A `Checkpoint` keeps each finished shard as one file
(safetensors, written to a temporary name and renamed, the sha256 of its values inside) in a hidden
folder; `identity.json` names the run that made it, and a run with another identity is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamlens.ablation.engine import Engine
from streamlens.ablation.spec import Ablation
from streamlens.data import TokenBatch
from streamlens.files import write_atomic
from streamlens.model import Model

CHECKPOINT_FOLDER = ".streamlens-checkpoint"  # hidden: write_outputs never touches it
SHARDS_PER_CHUNK = 32  # about this many shards of specs per chunk of texts (1 spec each for small sweeps)


# ----- shards -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Specs `specs` (indices into the call's specs) on texts [start, stop)."""

    index: int
    specs: tuple[int, ...]
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def plan(engine: Engine, specs: Sequence[Ablation], per_chunk: int = SHARDS_PER_CHUNK) -> list[Shard]:
    """The shards of one call, chunk by chunk: consecutive whole groups of `engine.groups(specs)`
    packed up to len(specs) / per_chunk specs, so a shard regroups exactly as the full call does."""
    target = max(1, -(-len(specs) // per_chunk))
    packs: list[list[int]] = []
    for group in engine.groups(specs):
        if not packs or len(packs[-1]) + len(group) > target:
            packs.append([])
        packs[-1].extend(group)
    return [Shard(index, tuple(pack), rows.start, rows.stop)
            for index, (rows, pack) in enumerate((rows, pack) for rows in engine.chunks for pack in packs)]


# ----- checkpoint -------------------------------------------------------------------------------
class CheckpointMismatch(ValueError):
    """A checkpoint folder made by another run (another model, data, units, method, ...)."""


def batch_digest(batch: TokenBatch) -> str:
    """sha256 of a batch's tokens, labels, scored and valid masks and targets."""
    digest = hashlib.sha256()
    for tensor in (batch.tokens, batch.labels, batch.scored, batch.valid, batch.targets):
        if tensor is not None:
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def section_key(engine: Engine, specs: Sequence[Ablation], shards: Sequence[Shard]) -> str:
    """What one call's shard values depend on: model, data, specs, metrics, seed, batch size, plan."""
    info = engine.model.info
    described = {
        "weights": info.weights_hash, "dtype": info.dtype, "data": batch_digest(engine.batch),
        "specs": [[spec.label, spec.method, spec.effect] for spec in specs], "metrics": list(engine.metrics),
        "seed": engine.seed, "chunk": engine.chunk, "variants": engine.variants_per_forward,
        "shards": [[list(shard.specs), shard.start, shard.stop] for shard in shards],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _values_digest(values: torch.Tensor, clean_loss: torch.Tensor) -> str:
    return hashlib.sha256(values.numpy().tobytes() + clean_loss.numpy().tobytes()).hexdigest()


class Checkpoint:
    """Finished shards of one run, one file each, in `folder`; refuses a folder of another run.

    `identity` names the run (model, weights hash, data digest and the settings that change the
    numbers); `identity.json` in the folder holds the identity of the run that made it (written
    with the first finished shard, so a run that fails before any work leaves nothing). Inside,
    each call of the run (one sweep, one greedy step) has a subfolder named by its `section_key`.
    """

    IDENTITY = "identity.json"

    def __init__(self, folder: str | os.PathLike[str], identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity, default=str))  # as it reads back from JSON
        stored = self.stored(self.folder)
        if stored is not None and stored != self.identity:
            differ = [key for key in sorted(set(stored) | set(self.identity)) if stored.get(key) != self.identity.get(key)]
            said = "; ".join(f"{key} {_short(stored.get(key))} there, {_short(self.identity.get(key))} now"
                             for key in differ[:4])
            raise CheckpointMismatch(f"checkpoint {self.folder} was made by another run ({said}): remove it to start "
                                     f"over, or choose another output folder")
        self._claimed = stored is not None  # the folder is written only once a shard is done

    @classmethod
    def for_run(cls, folder: str | os.PathLike[str], model: Model, batch: TokenBatch, **settings: Any) -> "Checkpoint":
        """A checkpoint whose identity is the model, the data and `settings` (unit, method, ...)."""
        info = model.info
        return cls(folder, {"model": info.name, "weights_hash": info.weights_hash, "dtype": info.dtype,
                            "data": batch.description, "data_sha256": batch_digest(batch), **settings})

    @classmethod
    def stored(cls, folder: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The identity of the run that made `folder` (None: no checkpoint there)."""
        path = Path(folder) / cls.IDENTITY
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as error:
            raise CheckpointMismatch(f"checkpoint {folder} has an unreadable {cls.IDENTITY} ({error}): remove the "
                                     f"folder to start over") from error

    def finished(self, key: str, shards: Sequence[Shard]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Shard index -> (values, clean loss) of the shards saved for call `key` (a file that fails its
        checks, e.g. torn by a power cut, is skipped and its shard computed again)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        done = {}
        section = self.folder / key[:32]
        for shard in shards:
            path = section / f"{shard.index:06d}.safetensors"
            if not path.is_file():
                continue
            try:
                raw = path.read_bytes()
                tensors = load(raw)
                meta = json.loads(_metadata(raw)["shard"])
            except (OSError, ValueError, KeyError, SafetensorError):
                continue
            values, clean_loss = tensors.get("values"), tensors.get("clean_loss")
            if (values is None or clean_loss is None or meta != _shard_meta(key, shard)
                    or _metadata(raw).get("sha256") != _values_digest(values, clean_loss)):
                continue
            done[shard.index] = (values, clean_loss)
        return done

    def save(self, key: str, shard: Shard, values: torch.Tensor, clean_loss: torch.Tensor) -> None:
        from safetensors.torch import save

        if not self._claimed:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / self.IDENTITY, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")
            self._claimed = True
        section = self.folder / key[:32]
        section.mkdir(parents=True, exist_ok=True)
        values, clean_loss = values.contiguous(), clean_loss.contiguous()
        meta = {"shard": json.dumps(_shard_meta(key, shard)), "sha256": _values_digest(values, clean_loss)}
        write_atomic(section / f"{shard.index:06d}.safetensors",
                     save({"values": values, "clean_loss": clean_loss}, metadata=meta))

    def remove(self) -> None:
        """Delete the checkpoint (after the run's outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _shard_meta(key: str, shard: Shard) -> dict[str, Any]:
    return {"key": key, "index": shard.index, "specs": list(shard.specs), "rows": [shard.start, shard.stop]}


def _metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (its first 8 bytes give the header length)."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]).get("__metadata__", {})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "...'"
