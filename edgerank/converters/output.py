"""Atomic outputs: build beside the destination, rename into place at the very end."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class OutputExistsError(FileExistsError):
    """The destination exists and ``force`` was not given."""


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
        if path.exists() and not force:
            raise OutputExistsError(f"{path} exists; pass --force (force=True) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
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
