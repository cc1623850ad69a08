"""The converted-model cache checks itself: damaged, truncated, partial, stale, concurrent and
interrupted entries, stale temporary folders, permissions and an unwritable cache.

A fake `build` (a few small files) stands in for the GGUF conversion so these run in a second; the
mechanism is the one `load_model` uses (test_model.py covers the real GGUF).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamlens.model import cache


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """An empty cache, a fake GGUF source and a build that counts its calls."""
    monkeypatch.setenv("STREAMLENS_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights" * 1000)

    return source, build, calls


def _entry_folder(source: Path) -> Path:
    return cache.cache_dir() / "gguf" / cache.file_hash(source)[:24]


def test_first_build_writes_a_manifest_and_shareable_files(env):
    source, build, calls = env
    entry = cache.converted(source, build)
    assert len(calls) == 1 and entry.folder == _entry_folder(source)
    manifest = json.loads((entry.folder / cache.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["source_sha256"] == cache.file_hash(source) and "transformers" in manifest["versions"]
    assert entry.weights_hash == cache.file_hash(entry.folder / "model.safetensors")  # what is loaded
    mask = os.umask(0)
    os.umask(mask)
    for path in entry.folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(entry.folder.stat().st_mode) == 0o777 & ~mask
    assert cache.converted(source, build) == entry and len(calls) == 1  # reused, not rebuilt


def _damage(path: Path, keep_mtime: bool) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[10:20] = bytes(10)
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("fault", ["damaged", "truncated", "partial", "missing file", "extra file", "stale"])
def test_a_bad_entry_is_rebuilt_with_one_line_of_notice(env, capsys, fault):
    source, build, calls = env
    folder = cache.converted(source, build).folder
    weights = folder / "model.safetensors"
    if fault == "damaged":
        _damage(weights, keep_mtime=False)
    elif fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif fault == "partial":
        (folder / cache.MANIFEST).unlink()
    elif fault == "missing file":
        (folder / "config.json").unlink()
    elif fault == "extra file":
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    else:
        manifest = json.loads((folder / cache.MANIFEST).read_text())
        manifest["versions"]["transformers"] = "0.0.1"
        (folder / cache.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    entry = cache.converted(source, build)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 2 and len(notice) == 1 and "rebuilding the cached model" in notice[0]
    assert entry.weights_hash == cache.file_hash(entry.folder / "model.safetensors")
    assert [p.name for p in entry.folder.parent.iterdir() if ".tmp" in p.name] == []


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_damage_that_keeps_size_and_mtime_is_found_by_default(env, capsys, name):
    source, build, calls = env
    folder = cache.converted(source, build).folder
    path = folder / name
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size, same mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    entry = cache.converted(source, build)
    assert len(calls) == 2 and "checksum of " + name in capsys.readouterr().err
    assert entry.weights_hash == cache.file_hash(entry.folder / "model.safetensors")  # the hash of what is read


def test_an_older_manifest_without_checksums_is_verified_once_and_upgraded(env, monkeypatch):
    source, build, calls = env
    folder = cache.converted(source, build).folder
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    for facts in manifest["files"].values():
        del facts["xxh3_128"]
    (folder / cache.MANIFEST).write_text(json.dumps(manifest))
    hashed = []
    real = cache.file_hash
    monkeypatch.setattr(cache, "file_hash", lambda path: hashed.append(Path(path).name) or real(path))
    cache.converted(source, build)
    cache.converted(source, build)
    assert len(calls) == 1 and sorted(hashed) == ["config.json", "model.safetensors"]  # sha256 once, then the checksum


def test_a_touched_but_intact_file_is_rehashed_once(env, monkeypatch):
    source, build, calls = env
    folder = cache.converted(source, build).folder
    os.utime(folder / "model.safetensors", ns=(1, 1))
    hashed = []
    real = cache.file_hash
    monkeypatch.setattr(cache, "file_hash", lambda path: hashed.append(Path(path).name) or real(path))
    cache.converted(source, build)
    cache.converted(source, build)
    assert len(calls) == 1 and hashed == ["model.safetensors"]  # the manifest learnt the new mtime


def test_the_source_is_not_rehashed_on_a_cached_load(env, monkeypatch):
    source, build, _ = env
    cache.converted(source, build)
    monkeypatch.setattr(cache, "file_hash", lambda path: pytest.fail(f"re-hashed {path}"))
    cache.converted(source, build)
    monkeypatch.undo()
    source.write_bytes(source.read_bytes() + b"changed")  # a new size: the memo no longer applies
    assert cache.converted(source, build).source_hash == cache.file_hash(source)


def test_an_interrupted_build_leaves_no_folder_and_heals(env):
    source, build, calls = env

    def interrupted(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.converted(source, interrupted)
    root = cache.cache_dir() / "gguf"
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    cache.converted(source, build)
    assert len(calls) == 1


def test_temporary_folders_of_dead_processes_are_swept(env):
    source, build, _ = env
    root = cache.cache_dir() / "gguf"
    root.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for name in (f"abc.tmp-{dead}-1234abcd", f"old.tmp{dead}"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"x" * 1000)
    alive = root / f"abc.tmp-{os.getppid()}-1234abcd"  # our parent runs: its folder may be in use
    alive.mkdir()
    cache.converted(source, build)
    names = {p.name for p in root.iterdir()}
    assert alive.name in names and not {f"abc.tmp-{dead}-1234abcd", f"old.tmp{dead}"} & names


def test_an_unwritable_cache_fails_at_once_naming_it(env, tmp_path, monkeypatch):
    source, build, calls = env
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("STREAMLENS_CACHE", str(blocker / "cache"))
    with pytest.raises(cache.CacheError, match=f"{blocker / 'cache' / 'gguf'} is not writable.*STREAMLENS_CACHE"):
        cache.converted(source, build)
    assert calls == []  # failed before any work


def test_a_readonly_cache_with_a_sound_entry_still_loads(env, monkeypatch):
    source, build, calls = env
    entry = cache.converted(source, build)
    monkeypatch.setattr(cache, "_check_writable", lambda root: pytest.fail("a sound entry needs no writing"))
    assert cache.converted(source, build) == entry


CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from streamlens.model import cache

    def build(out):
        with open(sys.argv[2], "a") as log:
            log.write("built\\n")
        time.sleep(1.0)  # long enough for the other process to arrive and wait on the lock
        (out / "model.safetensors").write_bytes(b"weights")

    print(cache.converted(Path(sys.argv[1]), build).weights_hash)
""")


def test_two_processes_converting_at_once_build_once(env, tmp_path):
    source, _, _ = env
    log = tmp_path / "builds.log"
    run = [sys.executable, "-c", CONCURRENT, str(source), str(log)]
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first, second = (subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
                     for _ in range(2))
    outputs = [process.communicate(timeout=60) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and log.read_text().count("built") == 1


def test_load_model_heals_a_damaged_cached_model_end_to_end(tmp_path, monkeypatch, capsys):
    """The issue's case: a zeroed stretch inside the cached model.safetensors. The next load notices,
    rebuilds, and gives the clean logits; provenance hashes the weights actually loaded."""
    import torch

    from streamlens.model import loading
    from streamlens.testing import tiny_model_folder

    monkeypatch.setenv("STREAMLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_convert_gguf", lambda gguf, out: tiny_model_folder(out, arch="llama"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF stand-in")
    clean = loading.load_model(str(source), dtype="float64")
    tokens = clean.to_tokens("w5 w6 w7 w8")
    expected = clean.run(tokens)
    weights = Path(clean.info.source) / "model.safetensors"
    assert clean.info.weights_hash == cache.file_hash(weights) != cache.file_hash(source)
    data = bytearray(weights.read_bytes())
    data[-4000:-2000] = bytes(2000)  # zero a stretch of the last tensor
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    healed = loading.load_model(str(source), dtype="float64")
    assert "rebuilding the cached model" in capsys.readouterr().err
    assert torch.equal(healed.run(tokens), expected) and healed.info.weights_hash == clean.info.weights_hash
