"""Where the engine's evaluations run: here or on Ray workers, resumable from a checkpoint.

A call of `evaluate` / `cumulative` with a backend is split into shards: a few whole groups of
specs (those that share forwards) x one chunk of `batch_size` texts, planned in chunk order. Every
shard is evaluated by the one engine (`Engine.per_text(specs, shard=...)`), which still takes the
means, the resample donors and the clean pass from all specs on the whole batch, so the gathered
per-text values are those of a run without a backend; the bootstrap runs once, on the driver.

- `LocalBackend`: the shards one after another in this process (what a checkpoint needs).
- `RayBackend`: one actor per worker loads the model once (on its own GPU for `device="cuda"`) and
  evaluates shards; `ray` is imported only when a `RayBackend` connects. `workers=N` starts a local
  cluster; `address="auto"` or "HOST:PORT" joins a running one (`ray start --head`).
- `checkpoint.Checkpoint`: each finished shard is one file under a hidden folder; a run with the
  same identity skips the shards it finds; a folder made by another run is refused, never mixed in.

Choosing where a run goes (`choose_backend`, `choose_batch_size`, `connect_ray`,
`check_backend_options`) is `ablation.placement`'s job.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from streamlens.ablation.checkpoint import (CHECKPOINT_FOLDER, Checkpoint, CheckpointMismatch, Shard, batch_digest,
                                            plan, section_key)
from streamlens.ablation.engine import Engine
from streamlens.ablation.spec import Ablation, Progress
from streamlens.data import TokenBatch
from streamlens.model import Model, load_model

__all__ = ["CHECKPOINT_FOLDER", "Checkpoint", "CheckpointMismatch", "LocalBackend", "RayBackend", "Shard",
           "batch_digest", "check_local_workers", "check_reachable", "free_memory", "notice_replaced", "plan",
           "run_shard", "section_key"]
IN_FLIGHT = 2  # shards queued on each Ray worker, so it never waits for the driver


# ----- shards -----------------------------------------------------------------------------------
def run_shard(engine: Engine, specs: list[Ablation], shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-text values [shard spec, metric, text in shard], clean loss [text in shard]) of one shard."""
    values = engine.per_text(specs, None, (shard.specs, shard.rows))
    return values[list(shard.specs), :, shard.rows].clone(), engine.clean_loss[shard.rows].clone()


def _gather(engine: Engine, specs: list[Ablation], progress: Progress | None, checkpoint: "Checkpoint | None",
            compute: Callable[[list[Shard]], Iterator[tuple[Shard, torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Per-text values [spec, metric, text] of all shards: those in the checkpoint, then `compute(rest)`
    (finished shards in any order, each saved before it counts). Fills `engine.clean_loss`."""
    shards = plan(engine, specs)
    out = torch.zeros(len(specs), len(engine.metrics), engine.batch.n_texts, dtype=torch.float64)
    key = None if checkpoint is None else section_key(engine, specs, shards)

    def take(shard: Shard, values: torch.Tensor, clean_loss: torch.Tensor) -> None:
        out[list(shard.specs), :, shard.rows] = values
        engine.clean_loss[shard.rows] = clean_loss
        if progress is not None:
            progress(len(shard.specs))

    done = {} if checkpoint is None else checkpoint.finished(key, shards)
    for index, (values, clean_loss) in done.items():
        take(shards[index], values, clean_loss)
    for shard, values, clean_loss in compute([shard for shard in shards if shard.index not in done]):
        if checkpoint is not None:
            checkpoint.save(key, shard, values, clean_loss)
        take(shard, values, clean_loss)
    return out


def _moved(batch: TokenBatch, device: torch.device) -> TokenBatch:
    """The batch with its tensors on `device`."""
    return dataclasses.replace(batch, **{item.name: getattr(batch, item.name).to(device)
                                         for item in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, item.name), torch.Tensor)})


# ----- backends ---------------------------------------------------------------------------------
class LocalBackend:
    """The shards one after another in this process, each saved to `checkpoint` (if any) when done."""

    description = "in-process"
    device = None

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint

    def per_text(self, engine: Engine, specs: list[Ablation], progress: Progress | None) -> torch.Tensor:
        def compute(shards: list[Shard]) -> Iterator[tuple[Shard, torch.Tensor, torch.Tensor]]:
            for shard in shards:
                yield (shard, *run_shard(engine, specs, shard))

        return _gather(engine, specs, progress, self.checkpoint, compute)


class _Worker:
    """A Ray actor: loads the model once, then evaluates shards with the engine."""

    def __init__(self, model_name: str, dtype: str, device: str, weights_hash: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = load_model(model_name, dtype=dtype, device=device)
        self.replaced = _reconstructed()  # a restart after its process died: the driver says so once
        if self.model.info.weights_hash != weights_hash:
            raise ValueError(f"worker on {socket.gethostname()} loaded {model_name!r} with weights sha256 "
                             f"{self.model.info.weights_hash[:12]}..., not the driver's {weights_hash[:12]}...")
        self.call: int | None = None

    def describe(self) -> dict[str, Any]:
        """Host, device and free memory (bytes) of this worker."""
        free = free_memory(self.model.info.device)
        return {"host": socket.gethostname(), "device": self.model.info.device, "free_bytes": free}

    def run(self, call: int, context: list, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        if self.call != call:  # a new call, or this actor was restarted: fetch the call's batch and specs
            import ray

            batch, names, seed, batch_size, specs = ray.get(context[0])
            self.engine = Engine(self.model, _moved(batch, self.model.device), names, seed, batch_size)
            self.specs, self.call = specs, call
        with torch.inference_mode():
            values, clean_loss = run_shard(self.engine, self.specs, shard)
        replaced, self.replaced = self.replaced, False
        return values, clean_loss, (socket.gethostname() if replaced else None)


class RayBackend:
    """Shards on Ray workers: one actor per worker, each with the model loaded once.

    Args:
        workers: number of workers (None: with `address`, one per GPU for device "cuda", else one
            per CPU of the cluster; without, 1).
        address: None starts a local cluster in this process; "auto" or "HOST:PORT" joins a running
            one (every node needs streamlens and the model, found by the same name or path).
        device: "cpu" or "cuda" (each worker takes one GPU; Ray sets which).
        threads: torch threads per worker (CPU workers reserve this many CPUs each).
        checkpoint: where finished shards are saved and found again.

    Use as a context manager (or call `close()`): the actors are ended and a local cluster shut down.
    """

    def __init__(self, workers: int | None = None, address: str | None = None, device: str = "cpu",
                 threads: int = 1, checkpoint: Checkpoint | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers {workers!r} must be a whole number of at least 1")
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"Ray workers run on cpu or cuda, not {device!r}")
        self.workers, self.address, self.threads, self.checkpoint = workers, address, threads, checkpoint
        self.device = device.split(":")[0]
        self._actors: list[Any] = []
        self._hosts: list[str] = []
        self._started_cluster = False
        self._calls = 0

    @property
    def description(self) -> str:
        where = "local cluster" if self.address is None else f"cluster at {self.address}"
        hosts = sorted(set(self._hosts))
        on = f" on {', '.join(hosts)}" if hosts else ""
        return f"ray: {self.workers} workers on {self.device} ({where}{on})"

    # ----- life cycle ------------------------------------------------------------------------------
    def connect(self) -> "RayBackend":
        """Start or join the cluster and check it can hold the workers (ValueError if not)."""
        try:
            import ray
        except ImportError as error:
            raise ValueError("Ray workers need Ray: pip install 'streamlens[ray]'") from error
        import logging

        gpus = 1 if self.device == "cuda" else 0
        if ray.is_initialized():  # this process already joined a cluster (e.g. a test session's): use it
            pass
        elif self.address is None:
            check_local_workers(self.workers or 1, self.threads, gpus)
            workers = self.workers or 1
            # the workers are the job (the driver waits): normal priority, not Ray's default niceness 15
            ray.init(num_cpus=max(workers * self.threads, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, _system_config={"worker_niceness": 0})
            self._started_cluster = True
        else:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ValueError(f"cannot join a Ray cluster at {self.address!r}: {error}") from error
        resources = ray.cluster_resources()
        cpus, gpu_count = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if self.workers is None:
            self.workers = (gpu_count if gpus else cpus // self.threads) if self.address is not None else 1
        need_cpus, need_gpus = (0 if gpus else self.workers * self.threads), self.workers * gpus
        if need_cpus > cpus or need_gpus > gpu_count or self.workers < 1:
            self.close()
            raise ValueError(f"the Ray cluster has {cpus} CPUs and {gpu_count} GPUs: not enough for {self.workers} "
                             f"workers on {self.device}" + (f" with {self.threads} threads each" if not gpus else ""))
        return self

    def start(self, model: Model) -> "RayBackend":
        """Start the workers (each loads `model` by its name or path, and checks its weights hash)."""
        if self._actors:
            return self
        self.connect()
        import ray

        info = model.info
        name = str(Path(info.name).resolve()) if Path(info.name).exists() else info.name
        actor = ray.remote(_Worker).options(
            num_cpus=1 if self.device == "cuda" else self.threads, num_gpus=1 if self.device == "cuda" else 0,
            max_restarts=2, max_task_retries=2)
        self._actors = [actor.remote(name, info.dtype, self.device, info.weights_hash, self.threads)
                        for _ in range(self.workers)]
        described = self._get([actor.describe.remote() for actor in self._actors])
        self._hosts = [item["host"] for item in described]
        self._free = [item["free_bytes"] for item in described]
        return self

    def free_bytes(self) -> int | None:
        """The least free device memory over the started workers (None on CPU)."""
        free = [value for value in getattr(self, "_free", []) if value is not None]
        return min(free) if free else None

    def close(self) -> None:
        try:
            import ray
        except ImportError:
            return
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_cluster and ray.is_initialized():
            ray.shutdown()
            self._started_cluster = False

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the work ------------------------------------------------------------------------------
    def per_text(self, engine: Engine, specs: list[Ablation], progress: Progress | None) -> torch.Tensor:
        self.start(engine.model)
        import ray

        batch = _moved(engine.batch, torch.device("cpu"))
        context = [ray.put((batch, engine.metrics, engine.seed, engine.batch_size, specs))]
        self._calls += 1
        call = self._calls

        def compute(shards: list[Shard]) -> Iterator[tuple[Shard, torch.Tensor, torch.Tensor]]:
            waiting = deque(shards)
            running: dict[Any, tuple[Any, Shard]] = {}

            def submit(actor: Any) -> None:
                shard = waiting.popleft()
                running[actor.run.remote(call, context, shard)] = (actor, shard)

            for actor in self._actors:
                for _ in range(IN_FLIGHT):
                    if waiting:
                        submit(actor)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, shard = running.pop(ready[0])
                values, clean_loss, replaced_on = self._get(ready[0])
                notice_replaced(replaced_on)
                if waiting:
                    submit(actor)
                yield shard, values, clean_loss

        return _gather(engine, specs, progress, self.checkpoint, compute)

    @staticmethod
    def _get(refs: Any) -> Any:
        """`ray.get`, with a worker's own error (a bad layer, a model that will not load) raised as itself."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(refs)
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except RayActorError as error:
            raise RuntimeError(f"a Ray worker died: {str(error).splitlines()[0]}") from error


# ----- checks and notices (issue 19) --------------------------------------------------------------
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's HOST:PORT before giving up (Ray itself retries for minutes)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse, within `timeout` seconds, a HOST:PORT where nothing listens ("auto" is left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        reason = "timed out" if isinstance(error, TimeoutError) else getattr(error, "strerror", None) or str(error)
        raise ValueError(f"no Ray cluster at {address} ({reason} within {timeout:g} s): start one there with `ray start "
                         f"--head`, or give its address") from None


def check_local_workers(workers: int, threads: int, gpus: int) -> None:
    """Refuse a local cluster of more CPU workers (x threads) than this machine has CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not gpus and workers * threads > cpus:
        raise ValueError(f"--workers {workers} with {threads} thread(s) each need {workers * threads} CPUs; this machine "
                         f"has {cpus}: use at most {max(1, cpus // threads)} workers")


def _reconstructed() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor, or an older Ray: not a restart we can know of
        return False


def notice_replaced(host: str | None) -> None:
    """One line on stderr when a shard came back from a worker that Ray restarted after its process died."""
    if host is not None:
        import sys

        print(f"streamlens: a Ray worker on {host} died and was replaced; its shards were run again", file=sys.stderr)


# ----- GPUs -------------------------------------------------------------------------------------
def free_memory(device: str | torch.device) -> int | None:
    """Free bytes on a CUDA device (None for other devices)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
