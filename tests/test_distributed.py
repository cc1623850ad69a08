"""Sweeps in shards: on Ray workers and resumed from a checkpoint, with the numbers of one in-process run.

Ray tests share one local cluster (2 CPUs) for this module and skip where Ray is not installed
(`pip install 'streamlens[ray]'`); CUDA tests run only where a GPU exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from streamlens import ablation as A
from streamlens import data as D
from streamlens.ablation import backends as B
from streamlens.ablation import placement as C
from streamlens.ablation.engine import Engine
from streamlens.cli import app
from streamlens.model import load_model
from streamlens.testing import tiny_model_folder

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed: "
                               "pip install 'streamlens[ray]'")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
runner = CliRunner()
pytestmark = pytest.mark.xdist_group("ray")  # one worker runs them all: one Ray cluster at a time
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_dist"), arch="llama")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder), dtype="float64")


@pytest.fixture(scope="module")
def batch():
    """10 random windows of 12 tokens: with batch size 4, three chunks (the last one short)."""
    tokens = torch.randint(3, 64, (10, 12), generator=torch.Generator().manual_seed(3))
    return D.window_batch(tokens, description="random windows")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    path = tmp_path_factory.mktemp("words") / "words.jsonl"
    lines = [json.dumps({"text": " ".join(f"w{3 + (7 * i + 5 * k) % 61}" for k in range(20))}) for i in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module; yields its address for commands that join it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20,
             _system_config={"worker_niceness": 0})  # as RayBackend's own local cluster
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _specs(model):
    units = A.units(model, "head") + A.units(model, "block")
    return [A.Ablation((site,), method, effect) for site in units for method in A.METHODS for effect in A.EFFECTS]


def _same(result, reference, tolerance=1e-12):
    torch.testing.assert_close(result.per_text, reference.per_text, rtol=0, atol=tolerance)
    if hasattr(reference, "clean_loss"):
        torch.testing.assert_close(result.clean_loss, reference.clean_loss, rtol=0, atol=tolerance)
    torch.testing.assert_close(result.values, reference.values, rtol=0, atol=tolerance)
    torch.testing.assert_close(result.ci_low, reference.ci_low, rtol=0, atol=tolerance)


# ----- shards and checkpoints, in this process ------------------------------------------------------
def test_shards_cover_every_spec_and_text_once(model, batch):
    specs = _specs(model)
    engine = Engine.of(model, batch, A.EvalOptions(batch_size=4))
    seen = torch.zeros(len(specs), batch.n_texts, dtype=torch.long)
    for shard in B.plan(engine, specs):
        seen[list(shard.specs), shard.start:shard.stop] += 1
    assert (seen == 1).all()


def test_local_backend_with_checkpoint_equals_one_call(model, batch, tmp_path):
    specs = _specs(model)
    reference = A.evaluate(model, batch, specs, batch_size=4, n_boot=100)
    checkpoint = B.Checkpoint.for_run(tmp_path / "ck", model, batch, purpose="test")
    counted = []
    sharded = A.evaluate(model, batch, specs, batch_size=4, n_boot=100, backend=B.LocalBackend(checkpoint),
                         progress=counted.append)
    _same(sharded, reference, 0)
    assert sum(counted) == len(specs) * 3  # (spec, chunk) evaluations, as without a backend
    assert len(list((tmp_path / "ck").rglob("*.safetensors"))) == len(B.plan(Engine.of(
        model, batch, A.EvalOptions(batch_size=4)), specs))


def test_killed_with_sigkill_halfway_then_resumed(folder, model, batch, tmp_path):
    """A process killed (SIGKILL) after half its shards; the rerun skips them, a torn file is redone."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from streamlens import ablation as A, data as D
        open({str(tmp_path / "modules.txt")!r}, "w").write(str("ray" in sys.modules))
        from streamlens.model import load_model
        model = load_model({str(folder)!r}, dtype="float64")
        tokens = torch.randint(3, 64, (10, 12), generator=torch.Generator().manual_seed(3))
        batch = D.window_batch(tokens, description="random windows")
        specs = [A.Ablation((s,), m, e) for s in A.units(model, "head") + A.units(model, "block")
                 for m in A.METHODS for e in A.EFFECTS]
        done = [0]
        def progress(n):
            done[0] += n
            if done[0] >= len(specs) * 3 // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint = A.Checkpoint.for_run({str(tmp_path / "ck")!r}, model, batch, purpose="test")
        A.evaluate(model, batch, specs, batch_size=4, backend=A.LocalBackend(checkpoint), progress=progress)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "modules.txt").read_text() == "False"  # importing streamlens.ablation does not load Ray
    files = sorted((tmp_path / "ck").rglob("*.safetensors"))
    specs = _specs(model)
    total = len(B.plan(Engine.of(model, batch, A.EvalOptions(batch_size=4)), specs))
    assert 0 < len(files) < total
    files[0].write_bytes(files[0].read_bytes()[:-20])  # as if torn by a power cut: computed again

    counted = []
    checkpoint = B.Checkpoint.for_run(tmp_path / "ck", model, batch, purpose="test")
    resumed = A.evaluate(model, batch, specs, batch_size=4, n_boot=100, backend=B.LocalBackend(checkpoint),
                         progress=counted.append)
    _same(resumed, A.evaluate(model, batch, specs, batch_size=4, n_boot=100), 0)
    assert sum(counted) == len(specs) * 3


def test_checkpoint_of_another_run_is_refused(model, batch, tmp_path):
    specs = _specs(model)[:4]
    checkpoint = B.Checkpoint.for_run(tmp_path / "ck", model, batch, unit="head")
    A.evaluate(model, batch, specs, batch_size=4, backend=B.LocalBackend(checkpoint))
    with pytest.raises(B.CheckpointMismatch, match="another run .*unit 'head' there, 'block' now"):
        B.Checkpoint.for_run(tmp_path / "ck", model, batch, unit="block")
    other = D.window_batch(batch.tokens.flip(0), description="random windows")
    with pytest.raises(B.CheckpointMismatch, match="data_sha256"):
        B.Checkpoint.for_run(tmp_path / "ck", model, other, unit="head")


def test_cli_resumes_refuses_another_run_and_cleans_up(folder, words, tmp_path, monkeypatch):
    """A run that dies after its sweeps leaves a checkpoint; another command is refused (exit 2, nothing
    written); the same command finishes from it and removes it."""
    import streamlens.pages.ablation as pages

    out = tmp_path / "out"
    args = ["ablate", "--model", str(folder), "--data", str(words), "--window", "8", "--unit", "mlp",
            "--method", "mean", "--bootstrap", "100", "--batch-size", "4", "--out", str(out)]
    reference = runner.invoke(app, [*args[:-1], str(tmp_path / "reference"), "--no-checkpoint"])
    assert reference.exit_code == 0, reference.output

    def crash(*_args, **_kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(pages, "ablation_files", crash)
        failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and "disk full" in failed.output
    checkpoint = out / B.CHECKPOINT_FOLDER
    assert len(list(checkpoint.rglob("*.safetensors"))) > 0

    for change in (["--unit", "attn"], ["--window", "6"], ["--method", "zero"]):
        changed = list(args)
        changed[changed.index(change[0]) + 1] = change[1]
        refused = runner.invoke(app, changed)
        assert refused.exit_code == 2 and "made by another run" in refused.output, refused.output
        assert sorted(p.name for p in out.iterdir()) == [B.CHECKPOINT_FOLDER]

    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert not checkpoint.exists()
    assert (out / "ablation.csv").read_text() == (tmp_path / "reference" / "ablation.csv").read_text()


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "0", "--workers 0 must be at least 1"),
    ("--ray-address", "not an address", "is not auto or HOST:PORT"),
])
def test_bad_backend_options_exit_2(folder, tmp_path, option, value, message):
    result = runner.invoke(app, ["ablate", "--model", str(folder), option, value, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_auto_batch_size_follows_free_memory(model):
    seven_b = C.ModelInfo("7b", "", "", "Llama", 32, 32, 4096, 128, 32000, 4096, "rms", "bfloat16", "cuda", 0.0)
    sizes = [C.auto_batch_size(seven_b, 512, gib << 30) for gib in (0, 1, 10, 40, 65, 1000)]
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] == 256
    float32 = C.auto_batch_size(dataclasses.replace(seven_b, dtype="float32"), 512, 65 << 30)
    assert float32 < C.auto_batch_size(seven_b, 512, 65 << 30)  # twice the bytes per value
    assert C.auto_batch_size(seven_b, 1024, 65 << 30) < C.auto_batch_size(seven_b, 512, 65 << 30)


# ----- Ray ------------------------------------------------------------------------------------------
@needs_ray
def test_ray_run_equals_in_process_run(cluster, model, batch):
    specs = _specs(model)
    counted = []
    with B.RayBackend(workers=2) as backend:
        on_ray = A.evaluate(model, batch, specs, batch_size=4, n_boot=100, backend=backend, progress=counted.append)
        order = A.units(model, "attn")
        greedy = A.cumulative(model, batch, order, "greedy", "resample", batch_size=4, n_boot=100, backend=backend)
    _same(on_ray, A.evaluate(model, batch, specs, batch_size=4, n_boot=100))
    assert sum(counted) == len(specs) * 3
    assert on_ray.provenance.backend.startswith("ray: 2 workers on cpu")
    reference = A.cumulative(model, batch, order, "greedy", "resample", batch_size=4, n_boot=100)
    _same(greedy, reference)
    assert greedy.sites == reference.sites


@needs_ray
def test_cli_on_ray_killed_with_sigkill_and_resumed(cluster, folder, words, tmp_path):
    """`ablate --ray-address` (float32) killed halfway with SIGKILL, run again: the files of one
    uninterrupted in-process run (values within 1e-6), and the checkpoint is gone."""
    out = tmp_path / "out"
    args = ["ablate", "--model", str(folder), "--data", str(words), "--window", "8", "--unit", "head", "--layers",
            "1-2", "--heads", "0,1", "--method", "resample", "--effect", "both", "--batch-size", "2", "--bootstrap",
            "200", "--out", str(out)]
    ray_args = [*args, "--ray-address", cluster, "--workers", "2"]
    command = [sys.executable, "-m", "streamlens", *ray_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                               start_new_session=True)
    checkpoint = out / B.CHECKPOINT_FOLDER
    total = 2 * 4 * 8  # effects x heads x chunks of 2 of the 16 windows: one shard each
    deadline = time.monotonic() + 300  # a wait, not a speed test: a busy 2-core CI box starts Ray slowly
    while len(list(checkpoint.rglob("*.safetensors"))) < total // 4:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "a quarter of the shards did not finish in 300 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    finished = len(list(checkpoint.rglob("*.safetensors")))
    assert total // 4 <= finished < total and not (out / "ablation.csv").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint.exists()
    reference = runner.invoke(app, [*args[:-1], str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    got, want = (pd.read_csv(path / "ablation.csv") for path in (out, tmp_path / "reference"))
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6)
    meta, want_meta = (json.loads((path / "ablation.json").read_text()) for path in (out, tmp_path / "reference"))
    assert meta.keys() == want_meta.keys() and "2 workers" in meta["backend"]
    differ = {key for key in meta if meta[key] != want_meta[key]}
    assert differ <= {"command", "created", "seconds", "backend", "threads"}, differ  # threads: the cores idle then


# ----- GPUs -----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_cuda_run_matches_cpu(folder, batch, dtype, tolerance):
    cpu = load_model(str(folder), dtype=dtype)
    gpu = load_model(str(folder), dtype=dtype, device="cuda")
    specs = _specs(cpu)
    on_cpu = A.evaluate(cpu, batch, specs, batch_size=4, n_boot=100)
    gpu_batch = D.window_batch(batch.tokens.to("cuda"), description=batch.description)
    size = C.auto_batch_size(gpu.info, 12, B.free_memory("cuda"))
    on_gpu = A.evaluate(gpu, gpu_batch, specs, batch_size=min(size, 4), n_boot=100)
    assert on_gpu.provenance.device.startswith("cuda")
    torch.testing.assert_close(on_gpu.per_text, on_cpu.per_text, rtol=0, atol=tolerance)


@needs_cuda
@needs_ray
def test_ray_workers_on_gpu(cluster, folder, batch):
    model = load_model(str(folder), dtype="float32")
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test cluster sees no GPU")
    specs = _specs(model)[:12]
    with B.RayBackend(workers=1, device="cuda") as backend:
        on_gpu = A.evaluate(model, batch, specs, batch_size=4, n_boot=100, backend=backend)
    assert on_gpu.provenance.device == "cuda"
    torch.testing.assert_close(on_gpu.per_text, A.evaluate(model, batch, specs, batch_size=4, n_boot=100).per_text,
                               rtol=0, atol=1e-4)


def _env() -> dict[str, str]:
    """This process's environment with this checkout first on the path (subprocesses import it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@needs_ray
def test_layer_study_on_two_workers_equals_in_process(cluster, folder, words, tmp_path):
    """`layers --workers 2`: every sweep of the study (singles, swaps, spans, greedy) on Ray workers;
    the same numbers as the in-process run (float64, so differences would be real)."""
    args = ["layers", "--model", str(folder), "--data", str(words), "--window", "8", "--max-windows", "4",
            "--greedy-pool", "2", "--bootstrap", "50", "--batch-size", "4", "--dtype", "float64"]
    here = runner.invoke(app, [*args, "--out", str(tmp_path / "here")])
    on_ray = runner.invoke(app, [*args, "--workers", "2", "--out", str(tmp_path / "ray")])
    assert here.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    got, want = (pd.read_csv(tmp_path / name / "layers.csv") for name in ("ray", "here"))
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-12)
    meta = json.loads((tmp_path / "ray" / "layers.json").read_text())
    assert "2 workers" in json.dumps(meta)
