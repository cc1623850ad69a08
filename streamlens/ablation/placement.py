"""Choosing where a run's sweeps go and how many sequences share a forward, before any work.

What the CLI's `--workers`, `--ray-address`, `--checkpoint` and `--batch-size` call, and a notebook in
one line: `check_backend_options` before any work, `connect_ray` to start or join the cluster,
`choose_batch_size` (an unfinished run's, else what fits the GPU (`auto_batch_size`), else 16), and
`choose_backend` (Ray, or in-process with a checkpoint, or None for a plain run):

    backend = choose_backend(model, batch, workers=2, checkpoint_folder="out/.streamlens-checkpoint")
    result = ablation.sweep(model, batch, "head", backend=backend)

Every check raises ValueError naming the bad value (the CLI exits 2 on it). The backends themselves
are `ablation.backends`'.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from streamlens.ablation.backends import LocalBackend, RayBackend, free_memory
from streamlens.ablation.checkpoint import Checkpoint
from streamlens.data import TokenBatch
from streamlens.model import Model
from streamlens.model.handle import ModelInfo

__all__ = ["DEFAULT_BATCH_SIZE", "auto_batch_size", "check_backend_options", "choose_backend", "choose_batch_size",
           "connect_ray", "stored_batch_size"]
DEFAULT_BATCH_SIZE = 16  # sequences per forward on a CPU (or a device whose free memory is unknown)
_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5})$")


def auto_batch_size(info: ModelInfo, n_positions: int, free_bytes: int, most: int = 256) -> int:
    """Sequences per forward that fit in `free_bytes` (weights already loaded), by an upper estimate.

    Per sequence of `n_positions`: the clean pass keeps resid_pre of every layer and, for direct
    effects and resample, up to two writes per layer (3 n_layers + 1 streams of d_model); one layer
    of a forward holds about 8 d_model values per position plus the attention scores (n_heads x
    n_positions); the unembedding works on 8192-entry vocabulary chunks in float32. 60% of the free
    memory is used, leaving room for the allocator and temporaries.
    """
    width = torch.finfo(getattr(torch, info.dtype)).bits // 8
    per_position = (width * ((3 * info.n_layers + 1) * info.d_model + 8 * info.d_model + 2 * info.n_heads * n_positions)
                    + 4 * 8192 + 8 * 8)
    return max(1, min(most, int(0.6 * free_bytes) // (per_position * n_positions)))


def check_backend_options(workers: int | None = None, ray_address: str | None = None, device: str = "cpu") -> bool:
    """Check where a sweep should run before any work (ValueError naming the bad value); True for Ray."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers {workers} must be at least 1")
    if ray_address is not None and not _ADDRESS.match(ray_address):
        raise ValueError(f"--ray-address {ray_address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    on_ray = workers is not None or ray_address is not None
    if on_ray and importlib.util.find_spec("ray") is None:
        raise ValueError("--workers and --ray-address need Ray: pip install 'streamlens[ray]'")
    if on_ray and device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} with Ray workers: choose cpu or cuda")
    return on_ray


def connect_ray(workers: int | None = None, ray_address: str | None = None, device: str = "cpu",
                threads: int | None = None) -> RayBackend:
    """A `RayBackend` on a started or joined cluster, checked to hold the workers (ValueError if not)."""
    check_backend_options(workers, ray_address, device)
    return RayBackend(workers, ray_address, device, threads or 1).connect()


def stored_batch_size(checkpoint_folder: str | os.PathLike[str]) -> int | None:
    """The batch size of the unfinished run whose checkpoint is `checkpoint_folder` (None: none there)."""
    try:
        stored = Checkpoint.stored(checkpoint_folder)
    except ValueError:
        return None
    value = None if stored is None else stored.get("batch_size")
    return value if isinstance(value, int) and value >= 1 else None


def choose_batch_size(model: Model, batch: TokenBatch, device: str | None = None, ray: RayBackend | None = None,
                      checkpoint_folder: str | os.PathLike[str] | None = None) -> int:
    """Sequences per forward: an unfinished run's (in `checkpoint_folder`, so a resumed run keeps its
    shards), else what fits the free memory of the GPU (the least over `ray`'s workers), else 16."""
    stored = None if checkpoint_folder is None else stored_batch_size(checkpoint_folder)
    if stored is not None:
        return stored
    free = ray.start(model).free_bytes() if ray is not None else free_memory(device or model.info.device)
    if free is None:
        return DEFAULT_BATCH_SIZE
    return auto_batch_size(model.info, batch.tokens.shape[1], free)


def choose_backend(model: Model, batch: TokenBatch, *, workers: int | None = None, ray_address: str | None = None,
                   device: str = "cpu", threads: int | None = None,
                   checkpoint_folder: str | os.PathLike[str] | None = None, identity: Mapping[str, Any] | None = None,
                   ray: RayBackend | None = None) -> "LocalBackend | RayBackend | None":
    """Where the sweeps of one run go: Ray workers (`workers` / `ray_address`, or a connected `ray`),
    else this process; with a `checkpoint_folder`, finished shards are kept there (`backend.checkpoint`)
    and a killed run resumes. None: a plain in-process run without checkpoint.

    identity: what else names the run (unit, method, batch size, ...): a checkpoint made by another
    run is refused (`CheckpointMismatch`). The caller closes a Ray backend (`with` or `close()`).
    """
    if ray is None and check_backend_options(workers, ray_address, device):
        ray = connect_ray(workers, ray_address, device, threads)
    saved = None
    if checkpoint_folder is not None:
        saved = Checkpoint.for_run(checkpoint_folder, model, batch, **dict(identity or {}))
    if ray is not None:
        ray.checkpoint = saved
        return ray
    return LocalBackend(saved) if saved is not None else None
