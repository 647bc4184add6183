"""Atomic outputs: build beside the destination, rename into place at the very end."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgerank.cli import check_location
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
    a parent that is a file, or a folder this process may not write into (missing folders
    are made)."""
    check_location(dest, flag="", parents=True)


_held = threading.local()  # the outputs this thread has claimed (claim is re-entrant)


def lock_path(dest: Path) -> Path:
    """The lock file beside ``dest`` that :func:`claim` holds."""
    return dest.with_name(f".{dest.name}.lock")


@contextmanager
def claim(dest: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock beside ``dest`` (an ``fcntl.flock`` on ``.NAME.lock``) through the block:
    one writer of ``dest`` at a time, across processes and threads. With ``wait`` False a
    held lock is an :class:`OutputExistsError` (two conversions to one output: the second
    refuses); with ``wait`` True it waits (the cache: the others load what the first wrote).
    Re-entrant within a thread, so the cache can hold it around a conversion that claims it."""
    dest = Path(dest).absolute()
    held = _held.__dict__.setdefault("paths", set())
    if dest in held:
        yield
        return
    fd = _acquire(lock_path(dest), wait, dest)
    held.add(dest)
    try:
        yield
    finally:
        held.discard(dest)
        try:  # removed while still held: a process waiting on this file retries on a new one
            lock_path(dest).unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(lock: Path, wait: bool, dest: Path) -> int:
    """A descriptor holding ``lock``: the file at that path when the lock was taken, not
    one its holder removed on release while this process waited on it."""
    from edgerank.errors import OutputLocationError

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputLocationError(f"cannot write {dest}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            mine = os.fstat(fd)
            now = os.stat(lock)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(f"{dest} is being written by another conversion (it holds {lock.name}); "
                                    "wait for it to finish, or choose another output") from None
        except FileNotFoundError:
            now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What is at ``path`` now (device, inode, modification time), None if nothing: a file
    written or a folder whose entries changed since is something else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _move_new(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless something is at ``dst``; False if something is."""
    if src.is_file():
        try:  # a hard link fails if dst exists: no instant where a file there could be replaced
            os.link(src, dst)
            os.unlink(src)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: checked, then renamed
            pass
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)  # onto a folder made in this instant: refused unless it is empty
    except OSError:
        return False
    return True


def _swap(src: Path, dst: Path, found: tuple[int, int, int]) -> bool:
    """Replace ``dst`` (what was ``found`` there at the start, edgerank's) by ``src``; False
    if something else is there now, left in place."""
    if _identity(dst) != found or not written_by_edgerank(dst):
        return False
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)  # aside first, so a failure keeps it
    if _identity(old)[:2] != found[:2] or not _move_new(src, dst):  # replaced in the last instant
        _move_new(old, dst)
        return False
    shutil.rmtree(old) if old.is_dir() else old.unlink()
    return True


def sibling(path: Path, folder: bool) -> Path:
    """Where a finished output goes when its destination was taken: ``NAME.new-PID`` (a
    file keeps its suffix: ``model.new-PID.gguf``)."""
    if path.suffix and not folder:
        return path.with_name(f"{path.stem}.new-{os.getpid()}{path.suffix}")
    return path.with_name(f"{path.name}.new-{os.getpid()}")


def _put_in_place(moves: list[tuple[Path, Path, tuple | None]]) -> None:
    """Move each finished ``src`` to its ``path``, replacing only what was found there at the
    start. Anything else there now (a user's folder made meanwhile, another process's output)
    is left as it is, the finished output is kept under :func:`sibling`, and the conversion
    is refused."""
    for src, path, found in moves:
        now = _identity(path)
        if now is None and _move_new(src, path) or now is not None and found is not None and _swap(src, path, found):
            continue
        kept = []
        for staged, p, _ in moves:
            there = sibling(p, staged.is_dir())
            if staged.exists() and _move_new(staged, there):
                kept.append(str(there))
        raise OutputExistsError(f"{path} was written by something else while this conversion ran: it is left as it "
                                f"is, and the conversion is kept at {', '.join(kept) or 'nowhere'}")


@contextmanager
def atomic_path(dest: Path, force: bool, is_dir: bool, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging path next to ``dest``; on success it replaces ``dest`` in one rename.

    ``dest`` is claimed (:func:`claim`) for the whole conversion, and at the end only what
    was there at the start is replaced: an output that appeared meanwhile is left in place
    and the conversion is kept beside it (:func:`_put_in_place`). ``companions`` names files
    that belong beside a file ``dest`` (a GGUF's LoRA adapter): they are written next to the
    staging file and moved beside ``dest`` just before it, so ``dest`` appearing means its
    companions are in place. On any exception (Ctrl-C included) the staging path is removed
    and ``dest`` is left exactly as it was.
    """
    dest = Path(dest)
    paths = [dest.with_name(n) for n in companions] + [dest]
    check_output_location(dest)
    with claim(dest):
        found = {path: _existing(path, force) for path in paths}
        staging = _staging(dest)
        target = staging if is_dir else staging / dest.name
        try:
            yield target
            _put_in_place([(staging / path.name if path != dest else target, path, found[path]) for path in paths])
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _existing(path: Path, force: bool) -> tuple[int, int, int] | None:
    """What is at ``path`` before a conversion, which it may replace: nothing, or with
    ``force`` something edgerank wrote; anything else is an :class:`OutputExistsError`."""
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to replace it")
    if (path.exists() or path.is_symlink()) and not written_by_edgerank(path):
        raise OutputExistsError(f"{path} exists and is not an edgerank artifact or GGUF: --force only "
                                "replaces what edgerank wrote; remove it yourself or choose another output")
    return _identity(path)


def _staging(dest: Path) -> Path:
    """A fresh staging folder beside ``dest``, with the mode a folder made there would have."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:  # a read-only or full file system: one clear error, nothing written
        from edgerank.errors import OutputLocationError

        raise OutputLocationError(f"cannot write {dest}: {e.strerror or e}") from e
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it 0700
    return staging
