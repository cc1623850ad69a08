"""Writing output files safely: never a half-written file, and a clear error for a bad folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output folder or file that cannot be written."""


def _named(out: str | os.PathLike[str]) -> Path:
    """`out` as a Path, refusing an empty name (it would mean the current folder) and a dangling link."""
    if not str(out).strip():
        raise OutputError(f"--out {str(out)!r} is empty: give a folder name such as streamlens-out")
    folder = Path(out).expanduser()
    if folder.is_symlink() and not folder.exists():
        raise OutputError(f"--out {folder} is a symlink to {os.readlink(folder)}, which does not exist")
    return folder


def prepare_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create `out` if needed and check that it is a writable folder."""
    folder = _named(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise OutputError(f"--out {folder} is not writable: {error.strerror or error}") from error
    return folder


def check_out_dir(out: str | os.PathLike[str]) -> Path:
    """Check, creating nothing, that `out` is or can become a writable folder (fail before any work)."""
    folder = _named(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    existing = folder.absolute()
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"--out {folder} cannot be created: {existing} is a symlink to a missing path")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {folder} cannot be created: {existing} is a file, not a folder")
    check_writable(existing, f"--out {folder}")
    return folder


def check_writable(folder: Path, what: str) -> None:
    """Create and remove a file in the existing `folder`: the only test that holds everywhere (root passes
    `os.access` on /proc and on read-only mounts, where creating a file then fails)."""
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".streamlens-write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise OutputError(f"{what} is not writable: {folder} does not allow writing "
                          f"({error.strerror or error})") from None


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write `content` to a temporary file beside `path`, then rename it into place."""
    target = Path(path)
    mode = "wb" if isinstance(content, bytes) else "w"
    handle = tempfile.NamedTemporaryFile(mode, dir=target.parent, prefix=f".{target.name}.", delete=False,
                                         **({} if mode == "wb" else {"encoding": "utf-8"}))
    try:
        with handle:
            handle.write(content)
        os.chmod(handle.name, 0o666 & ~umask())  # temporary files are private; outputs are not
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target


def umask() -> int:
    """This process's umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


OUTPUTS_MANIFEST = ".streamlens-outputs.json"
_STAGING = ".streamlens-staging-"


def write_outputs(out: str | os.PathLike[str], files: dict[str, str | bytes], set_name: str | None = None) -> Path:
    """Write one command's output files into the folder `out` as one set; the one output path of every command.

    Every file is first written into a temporary folder inside `out`; only when all are written are
    they moved into place, and the files of the previous set (listed in `out`'s manifest) that this
    set lacks are removed, so no file of an earlier run survives beside this run's. A failure while
    writing, or while moving the set in, leaves the earlier set as it was. Temporary folders of
    processes that died are swept.

    Args:
        out: the folder (created if needed).
        files: plain file name -> text or bytes.
        set_name: commands that share a folder keep separate sets (e.g. "report" beside an ablation);
            None: the folder's one set. A single-file command names its set after its file (no
            manifest is then needed: replacing that one file atomically replaces the set).
    """
    import json

    for name in files:
        if not name or Path(name).name != name or name.startswith("."):
            raise OutputError(f"output name {name!r} must be a plain file name")
    folder = prepare_out_dir(out)
    for name in files:
        if (folder / name).is_dir():
            raise OutputError(f"{folder / name} is a folder: cannot write the {name} file there")
    manifest = folder / (OUTPUTS_MANIFEST if set_name is None else f".streamlens-outputs-{set_name}.json")
    _sweep(folder)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f"{_STAGING}{os.getpid()}-"))
    try:
        for name, content in files.items():
            write_atomic(staging / name, content)
        previous = _manifest(manifest)
        _swap(folder, staging, list(files), sorted(previous - set(files)))
        if list(files) != [set_name]:  # a set that is one file named by set_name is its own manifest
            write_atomic(manifest, json.dumps(sorted(files)) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _swap(folder: Path, staging: Path, names: list[str], stale: list[str]) -> None:
    """Move the staged files in; the files they replace (and `stale`) go aside first and come back on failure."""
    aside = staging / ".previous"
    aside.mkdir()
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in [*names, *stale]:
            if (folder / name).exists() or (folder / name).is_symlink():
                os.replace(folder / name, aside / name)
                moved_aside.append(name)
        for name in names:
            os.replace(staging / name, folder / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            (folder / name).unlink(missing_ok=True)
        for name in moved_aside:
            os.replace(aside / name, folder / name)
        raise


def _sweep(folder: Path) -> None:
    """Remove staging folders left by processes that no longer run (killed mid-write)."""
    for path in folder.glob(f"{_STAGING}*"):
        pid = path.name[len(_STAGING):].split("-")[0]
        if pid.isdigit() and path.is_dir() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _manifest(path: Path) -> set[str]:
    """File names of the previous output set (empty when there is none or it is unreadable)."""
    import json

    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(names, list):
        return set()
    return {name for name in names if isinstance(name, str) and name and Path(name).name == name
            and not name.startswith(".")}
