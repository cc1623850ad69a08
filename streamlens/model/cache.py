"""The converted-model cache: a GGUF file dequantised once into a safetensors folder that checks itself.

An entry is `<cache>/gguf/<sha256 of the GGUF, 24 hex>/` holding the HF files and `manifest.json`,
written last: the sha256, size and mtime of every file, the GGUF's sha256, and the streamlens and
transformers versions that made it. A load trusts an entry only through its manifest:
- every load reads every file whole and checks its XXH3-128 checksum against the manifest (about
  6 GB/s: ~0.1 s for SmolLM2's 540 MB), so damage that keeps the size and the mtime (a flipped byte,
  an edited `rms_norm_eps`) is caught by default; a file whose size differs is damaged at once; a
  file whose mtime differs, one whose manifest has no checksum (an older entry), and with
  `verify=True` every file, is re-hashed with sha256 against the manifest;
- a missing manifest (a partial entry), a missing, extra or changed file (damage) or other versions
  (a stale entry) make the entry be rebuilt, with one line of notice on stderr.

Building runs under a file lock beside the entry, so a second process waits and then reuses what the
first built. It builds into `<key>.tmp-<pid>-<random>` and renames that into place; the temporary
folder is removed on any failure or interrupt, and ones left by dead processes are swept. Files get
the usual umask permissions, so a shared cache is readable by others. The GGUF's own sha256 is
remembered under its path, size and mtime (`<cache>/sources/`), so a cached load does not re-read the
whole GGUF. A cache that cannot be written fails at once, naming the folder and `STREAMLENS_CACHE`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamlens.files import process_alive, umask, write_atomic

CACHE_ENV = "STREAMLENS_CACHE"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when an entry's layout changes: older entries are then rebuilt as stale
_TEMP = re.compile(r"\.tmp-?(\d+)")  # `<key>.tmp-<pid>-<hex>` (and the older `<key>.tmp<pid>`)


class CacheError(ValueError):
    """A cache that cannot be used (not writable) or an entry that cannot be built."""


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: the folder to load and the sha256 of its weights file."""

    folder: Path
    weights_hash: str
    source_hash: str


def cache_dir() -> Path:
    """Where converted GGUF weights are kept: $STREAMLENS_CACHE or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("streamlens"))


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, hex."""
    return _digest(path, hashlib.sha256())


def quick_hash(path: Path) -> str:
    """XXH3-128 of a file's bytes, hex: a checksum (not a defence against a forger, who could rewrite the
    manifest too) that catches any accidental change, ~30x faster than sha256 here."""
    import xxhash

    return _digest(path, xxhash.xxh3_128())


def _digest(path: Path, digest: Any) -> str:
    buffer = bytearray(1 << 23)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def source_hash(path: Path, verify: bool = False) -> str:
    """sha256 of a GGUF file, remembered under (path, size, mtime) so a cached load does not re-read it."""
    stat = path.stat()
    memo = cache_dir() / "sources" / hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    if not verify:
        try:
            known = memo.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", known):
                return known
        except OSError:
            pass
    digest = file_hash(path)
    try:  # best effort: a read-only cache just re-hashes next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, digest + "\n")
    except OSError:
        pass
    return digest


def converted(gguf: Path, build: Callable[[Path], None], verify: bool = False,
              versions: dict[str, str] | None = None) -> Entry:
    """The verified cache entry for `gguf`, built by `build(empty_folder)` when absent, damaged or stale.

    Args:
        gguf: the source GGUF file.
        build: writes the HF folder (config, tokenizer, model.safetensors) into the folder it is given.
        verify: re-hash every cached file with sha256 (and the GGUF) instead of checking the weights'
            checksum (XXH3-128) against the manifest.
        versions: library versions recorded in the manifest; an entry with others is stale
            (default: streamlens and transformers).
    """
    versions = versions or _versions()
    source = source_hash(gguf, verify=verify)
    root = cache_dir() / "gguf"
    folder = root / source[:24]
    problem = _check(folder, source, versions, verify)
    if problem is None:
        return _entry(folder, source)
    _check_writable(root)
    from filelock import FileLock

    lock = Path(str(folder) + ".lock")
    with FileLock(str(lock)):
        problem = _check(folder, source, versions, verify)  # another process may have built it meanwhile
        if problem is None:
            return _entry(folder, source)
        _sweep(root)
        if problem != "absent":
            print(f"streamlens: rebuilding the cached model {folder} ({problem})", file=sys.stderr)
            _remove(folder)
        try:
            _build(folder, gguf, source, versions, build)
        except BaseException:
            # a failed conversion leaves no entry, so its lock file is litter; a process that waits on it
            # takes the lock of the unlinked file, finds no entry and converts (and fails) on its own
            lock.unlink(missing_ok=True)
            raise
    return _entry(folder, source)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("streamlens", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _entry(folder: Path, source: str) -> Entry:
    manifest = json.loads((folder / MANIFEST).read_text())
    return Entry(folder, manifest["files"]["model.safetensors"]["sha256"], source)


def _check(folder: Path, source: str, versions: dict[str, str], verify: bool) -> str | None:
    """None when the entry is sound; otherwise what is wrong with it, in a few words."""
    if not folder.is_dir():
        return "absent"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, dict] = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("source_sha256") != source:
            return "stale: made from another source or by an older layout"
        if manifest.get("versions") != versions:
            return f"stale: made by {manifest.get('versions')}, now {versions}"
        if "model.safetensors" not in files:
            return "damaged: its manifest lists no model.safetensors"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "partial: no readable manifest"
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        return f"damaged: {'missing ' + ', '.join(missing) if missing else 'unexpected ' + ', '.join(extra)}"
    touched = False
    for name, facts in files.items():
        stat = (folder / name).stat()
        if stat.st_size != facts["size"]:
            return f"damaged: {name} has {stat.st_size} bytes, its manifest says {facts['size']}"
        if verify or stat.st_mtime_ns != facts["mtime_ns"] or "xxh3_128" not in facts:
            if file_hash(folder / name) != facts["sha256"]:
                return f"damaged: the sha256 of {name} differs from its manifest"
            touched |= stat.st_mtime_ns != facts["mtime_ns"] or "xxh3_128" not in facts
            facts["mtime_ns"] = stat.st_mtime_ns
            facts.setdefault("xxh3_128", quick_hash(folder / name))
        elif quick_hash(folder / name) != facts["xxh3_128"]:
            return f"damaged: the checksum of {name} differs from its manifest (changed in place: same size and mtime)"
    if touched:  # same bytes, new mtime (a copy, a touch) or an older manifest: remember it, the next load is cheap
        try:
            write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
        except OSError:
            pass
    return None


def _build(folder: Path, gguf: Path, source: str, versions: dict[str, str], build: Callable[[Path], None]) -> None:
    """Build into a temporary folder beside `folder`, write the manifest last, rename it into place."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(mode=0o777)  # umask applies: a shared cache stays readable
        build(tmp)
        files = {}
        for path in sorted(tmp.iterdir()):
            if not path.is_file() or path.name == MANIFEST:
                raise CacheError(f"building the cache entry left {path.name!r}, which is not a plain file")
            os.chmod(path, 0o666 & ~umask())
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_hash(path),
                                "xxh3_128": quick_hash(path)}
        if "model.safetensors" not in files:
            raise CacheError(f"converting {gguf} wrote no model.safetensors")
        manifest = {"format": FORMAT, "source": str(gguf), "source_sha256": source, "versions": versions,
                    "files": files}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o777 & ~umask())
        tmp.rename(folder)  # atomic: a half-built entry is never seen under the entry's name
    except BaseException:  # failures and interrupts alike: never leave a half-built folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise CacheError(
            f"the model cache {root} is not writable ({error.strerror or error}): the GGUF must be converted "
            f"once; set {CACHE_ENV} to a writable folder") from None


def _remove(folder: Path) -> None:
    """Remove a bad entry: renamed aside first (atomic), so no reader sees it half-deleted."""
    aside = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _sweep(root: Path) -> None:
    """Remove temporary folders left by processes that no longer run."""
    for path in root.iterdir():
        match = _TEMP.search(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # under the lock, our own leftovers (an earlier failed build) are stale too
    return process_alive(pid)
