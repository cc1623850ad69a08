"""Where a command's sweeps run: the `--workers`, `--ray-address` and `--checkpoint` options.

The choices are `ablation.placement`'s (`choose_backend`, `choose_batch_size`); here their errors
exit 2. Shared by the commands that sweep ablations (`ablate`, `layers`, `report`). Only typer is
imported at module level; Ray is imported only when a command is given `--workers` or `--ray-address`.
"""

from __future__ import annotations

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


def check_backend_options(workers: int | None, ray_address: str | None, device: str) -> bool:
    """Check the options before any work; True when the sweep runs on Ray (bad options exit 2)."""
    from streamlens.ablation.placement import check_backend_options as check

    try:
        return check(workers, ray_address, device)
    except ValueError as error:
        fail(str(error))


def connect(workers: int | None, ray_address: str | None, device: str, threads: int | None):
    """Start or join the Ray cluster (a check: an unreachable or too small cluster exits 2)."""
    from streamlens.ablation.placement import connect_ray

    try:
        return connect_ray(workers, ray_address, device, threads)
    except ValueError as error:
        fail(str(error))


def checkpoint_folder(out: str) -> Path:
    from streamlens.ablation.backends import CHECKPOINT_FOLDER

    return Path(out) / CHECKPOINT_FOLDER


def choose_batch_size(ray, model, batch, device: str, out: str | None = None) -> int:
    """`ablation.placement.choose_batch_size`: an unfinished run's in `out`, else from the GPU, else 16."""
    from streamlens.ablation.placement import choose_batch_size as choose

    return choose(model, batch, device, ray, None if out is None else checkpoint_folder(out))


def backend_for(ray, checkpoint: bool, out: str, model, batch, identity: dict[str, Any]):
    """The backend of the sweeps (None: plain in-process) with its checkpoint (None: no checkpoint)."""
    from streamlens.ablation.placement import choose_backend

    try:
        backend = choose_backend(model, batch, ray=ray, identity=identity,
                                 checkpoint_folder=checkpoint_folder(out) if checkpoint else None)
    except ValueError as error:
        fail(str(error))
    saved = None if backend is None else backend.checkpoint
    if saved is not None:
        resume_notice(saved.folder)
    return backend, saved


def resume_notice(folder: Path) -> None:
    """One line on stderr when a run picks up the finished shards of an interrupted one."""
    finished = sum(1 for _ in folder.rglob("*.safetensors")) if folder.is_dir() else 0
    if finished:
        typer.echo(f"streamlens: resuming from {finished} finished shards in {folder}", err=True)
