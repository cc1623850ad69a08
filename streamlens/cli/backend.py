"""Where a command's sweeps run: the `--workers`, `--ray-address` and `--checkpoint` options.

Shared by the commands that sweep ablations (`ablate` now). Only typer is imported at module
level; Ray is imported only when a command is given `--workers` or `--ray-address`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import typer

from streamlens.cli.common import fail

WORKERS = typer.Option(None, "--workers", help="Spread the sweep over N Ray workers (a local Ray cluster; "
                       "pip install 'streamlens[ray]'). Each loads the model once (one GPU each with --device cuda).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Join a running Ray cluster: auto or HOST:PORT "
                           "(default --workers: one per GPU with --device cuda, else one per CPU).")
CHECKPOINT = typer.Option(True, "--checkpoint/--no-checkpoint", help="Save finished shards in OUT/"
                          ".streamlens-checkpoint: the same command after a crash resumes there (removed when done).")
_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5})$")


def check_backend_options(workers: int | None, ray_address: str | None, device: str) -> bool:
    """Check the options before any work; True when the sweep runs on Ray."""
    if workers is not None and workers < 1:
        fail(f"--workers {workers} must be at least 1")
    if ray_address is not None and not _ADDRESS.match(ray_address):
        fail(f"--ray-address {ray_address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    on_ray = workers is not None or ray_address is not None
    if on_ray and importlib.util.find_spec("ray") is None:
        fail("--workers and --ray-address need Ray: pip install 'streamlens[ray]'")
    if on_ray and device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"--device {device!r} with Ray workers: choose cpu or cuda")
    return on_ray


def connect(workers: int | None, ray_address: str | None, device: str, threads: int | None):
    """Start or join the Ray cluster (a check: an unreachable or too small cluster exits 2)."""
    from streamlens.ablation.backends import RayBackend

    try:
        return RayBackend(workers, ray_address, device, threads or 1).connect()
    except ValueError as error:
        fail(str(error))


def checkpoint_folder(out: str) -> Path:
    from streamlens.ablation.backends import CHECKPOINT_FOLDER

    return Path(out) / CHECKPOINT_FOLDER


def stored_batch_size(out: str) -> int | None:
    """The batch size of an unfinished run in `out` (resuming with an automatic batch size keeps it)."""
    from streamlens.ablation.backends import Checkpoint

    try:
        stored = Checkpoint.stored(checkpoint_folder(out))
    except ValueError:
        return None
    value = None if stored is None else stored.get("batch_size")
    return value if isinstance(value, int) and value >= 1 else None


def choose_batch_size(ray, model, batch, device: str) -> int:
    """Sequences per forward from the free memory of the GPU (the least free over Ray workers)."""
    from streamlens.ablation.backends import auto_batch_size, free_memory

    free = ray.start(model).free_bytes() if ray is not None else free_memory(device)
    if free is None:
        return 16
    return auto_batch_size(model.info, batch.tokens.shape[1], free)


def backend_for(ray, checkpoint: bool, out: str, model, batch, identity: dict[str, Any]):
    """The backend of the sweeps (None: plain in-process) with its checkpoint (None: no checkpoint)."""
    from streamlens.ablation.backends import Checkpoint, LocalBackend

    saved = None
    if checkpoint:
        try:
            saved = Checkpoint.for_run(checkpoint_folder(out), model, batch, **identity)
        except ValueError as error:
            fail(str(error))
        resume_notice(saved.folder)
    if ray is not None:
        ray.checkpoint = saved
        return ray, saved
    return (LocalBackend(saved) if saved is not None else None), saved


def resume_notice(folder: Path) -> None:
    """One line on stderr when a run picks up the finished shards of an interrupted one."""
    finished = sum(1 for _ in folder.rglob("*.safetensors")) if folder.is_dir() else 0
    if finished:
        typer.echo(f"streamlens: resuming from {finished} finished shards in {folder}", err=True)
