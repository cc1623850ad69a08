"""Writing output files safely: never a half-written file, and a clear error for a bad folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output folder or file that cannot be written."""


def prepare_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create `out` if needed and check that it is a writable folder."""
    folder = Path(out)
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
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {folder} is not writable ({existing} does not allow writing)")
    return folder


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write `content` to a temporary file beside `path`, then rename it into place."""
    target = Path(path)
    mode = "wb" if isinstance(content, bytes) else "w"
    handle = tempfile.NamedTemporaryFile(mode, dir=target.parent, prefix=f".{target.name}.", delete=False,
                                         **({} if mode == "wb" else {"encoding": "utf-8"}))
    try:
        with handle:
            handle.write(content)
        os.chmod(handle.name, 0o666 & ~_umask())  # temporary files are private; outputs are not
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OUTPUTS_MANIFEST = ".streamlens-outputs.json"


def write_outputs(out: str | os.PathLike[str], files: dict[str, str | bytes]) -> Path:
    """Write one command's output files into the folder `out` as one set; the one output path of every command.

    Every file is first written into a temporary folder inside `out`; only when all are written are
    they moved into place, and the files of the previous set (listed in `out`'s manifest) that this
    set lacks are removed, so no file of an earlier run survives beside this run's. A failure while
    writing leaves the earlier set as it was.
    """
    import json
    import shutil

    for name in files:
        if not name or Path(name).name != name or name.startswith("."):
            raise OutputError(f"output name {name!r} must be a plain file name")
    folder = prepare_out_dir(out)
    for name in files:
        if (folder / name).is_dir():
            raise OutputError(f"{folder / name} is a folder: cannot write the {name} file there")
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".streamlens-staging-"))
    try:
        for name, content in files.items():
            write_atomic(staging / name, content)
        previous = _manifest(folder)
        for name in files:
            os.replace(staging / name, folder / name)
        for name in previous - set(files):
            (folder / name).unlink(missing_ok=True)
        write_atomic(folder / OUTPUTS_MANIFEST, json.dumps(sorted(files)) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _manifest(folder: Path) -> set[str]:
    """File names of the previous output set in `folder` (empty when there is none or it is unreadable)."""
    import json

    try:
        names = json.loads((folder / OUTPUTS_MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {name for name in names if isinstance(name, str) and Path(name).name == name and not name.startswith(".")}
