"""Atomic outputs: build beside the destination, rename into place at the very end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgerank.runtime.layout import FORMAT, GRAPH_FORMAT, MANIFEST, REPORT_SUFFIX


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class OutputExistsError(FileExistsError):
    """The destination exists and ``force`` was not given, or it is something edgerank did
    not write, which ``force`` never replaces."""



def umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def written_by_edgerank(path: Path) -> bool:
    """Whether ``path`` is something edgerank's converters wrote, which ``force`` may replace:
    an artifact folder (a ``manifest.json`` whose format field is edgerank's, and no file
    the manifest does not list), a GGUF file (its header), or a conversion report. Anything
    else, a user's folder above all, is never replaced."""
    path = Path(path)
    try:
        if path.is_symlink():
            return False
        if path.is_dir():
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, GRAPH_FORMAT):
                return False
            listed = set(manifest.get("files") or {}) | {MANIFEST}
            return all(str(f.relative_to(path)) in listed for f in path.rglob("*") if not f.is_dir())
        if path.is_file():
            if path.name.endswith(REPORT_SUFFIX):
                report = json.loads(path.read_text())
                return isinstance(report, dict) and {"source", "output", "format"} <= set(report)
            with open(path, "rb") as f:
                return f.read(4) == b"GGUF"
    except (OSError, ValueError):
        return False
    return False


def check_output_location(dest: Path) -> None:
    """Raise :class:`OutputLocationError` before any work if ``dest`` cannot be written:
    a parent that is a file, or a folder this process may not write into."""
    from edgerank.errors import OutputLocationError

    dest = Path(dest).absolute()
    parent = dest.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise OutputLocationError(f"cannot write {dest}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputLocationError(f"cannot write {dest}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputLocationError(f"cannot write {dest}: the folder {parent} is not writable")


@contextmanager
def atomic_path(dest: Path, force: bool, is_dir: bool, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging path next to ``dest``; on success it replaces ``dest`` in one rename.

    ``companions`` names files that belong beside a file ``dest`` (a GGUF's LoRA adapter):
    they are written next to the staging file and moved beside ``dest`` just before it, so
    ``dest`` appearing means its companions are in place. On any exception (Ctrl-C
    included) the staging path is removed and ``dest`` is left exactly as it was.
    """
    dest = Path(dest)
    for path in (dest, *(dest.with_name(n) for n in companions)):
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputExistsError(f"{path} exists; pass --force (force=True) to replace it")
        if (path.exists() or path.is_symlink()) and not written_by_edgerank(path):
            raise OutputExistsError(f"{path} exists and is not an edgerank artifact or GGUF: --force only "
                                    "replaces what edgerank wrote; remove it yourself or choose another output")
    check_output_location(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:  # a read-only or full file system: one clear error, nothing written
        from edgerank.errors import OutputLocationError

        raise OutputLocationError(f"cannot write {dest}: {e.strerror or e}") from e
    # mkdtemp makes the folder 0700; the output gets the mode any folder made here would
    os.chmod(staging, 0o777 & ~umask())
    target = staging if is_dir else staging / dest.name
    try:
        yield target
        for name in companions:
            os.replace(staging / name, dest.with_name(name))
        if dest.exists():  # force: move the old one aside first, so a failure keeps it
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(target, dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
