"""What the command lines share: argument types, one ``error: ...`` line and exit status 2
instead of a traceback, the one check of an output before any work (``check_output``: never
an input, in a folder that can take it) and its atomic write (``atomic_file``), and
plain-text tables (the tools print theirs with rich)."""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from edgerank.errors import EdgerankError, OutputLocationError, OutputOverlapError


def refuse_output_over_inputs(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Raise :class:`OutputOverlapError` if writing ``out`` would replace one of ``inputs``.
    Paths are compared resolved, links followed; ``None`` and names that are not on disk
    (a built-in model, an ``hf:`` id) are skipped, since writing cannot destroy them."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        src = Path(item).expanduser().resolve()
        if src == target or target in src.parents:
            raise OutputOverlapError(f"{out} {'is' if src == target else 'holds'} the input {item}: "
                                     "writing there would destroy it; choose another output")


def check_output(out: str | os.PathLike, *inputs: str | os.PathLike | None, flag: str = "--out",
                 folder: bool = False, parents: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written where it is asked: one of
    ``inputs`` or a path inside one (data, model, artifact, cache folders), a folder where a
    file goes (``folder`` False), or a place whose folder is missing (unless ``parents``: the
    command makes it), a file, or not writable. Returns ``out`` as a path."""
    path = Path(out).expanduser()
    refuse_output_over_inputs(path, *inputs)
    refuse_output_inside_inputs(path, *inputs, flag=flag)
    if not folder and path.is_dir():
        raise OutputLocationError(f"{flag} {out} is a folder; give a file name")
    check_location(path, flag, parents)
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise OutputLocationError(f"{flag} {out}: not writable")
    return path


def refuse_output_inside_inputs(out: str | os.PathLike, *inputs: str | os.PathLike | None, flag: str = "--out") -> None:
    """Raise :class:`OutputOverlapError` if ``out`` lies inside an input folder: a file added
    to a model, an artifact or a collection changes what it is (an artifact holding a file
    its manifest does not list is refused at load; a model's cache name moves)."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is not None and Path(item).expanduser().is_dir() and Path(item).expanduser().resolve() in target.parents:
            raise OutputOverlapError(f"{flag} {out} is inside the input folder {item}: writing there would change "
                                     "what is being read; choose another output")


def check_location(path: str | os.PathLike, flag: str = "--out", parents: bool = False) -> None:
    """Raise :class:`OutputLocationError` if ``path`` cannot be created: its folder (or, with
    ``parents``, its nearest existing ancestor) is missing, a file, a broken link, or not
    writable by this process."""
    named = f"{flag} {path}" if flag else str(path)
    parent = Path(path).expanduser().absolute().parent
    found = parent
    while not found.exists():
        if found.is_symlink():  # a dangling link: mkdir would fail on it
            raise OutputLocationError(f"cannot write {named}: {found} is a broken link")
        found = found.parent
    if not found.is_dir():
        raise OutputLocationError(f"cannot write {named}: {found} is a file, not a folder")
    if found != parent and not parents:
        raise OutputLocationError(f"{named}: the folder {parent} does not exist")
    if not os.access(found, os.W_OK | os.X_OK):
        raise OutputLocationError(f"cannot write {named}: the folder {found} is not writable")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path beside ``path`` to write the output to; when the block ends without an
    error it is renamed over ``path`` in one step, else removed. A reader never sees half a
    file, and a failed or interrupted write leaves ``path`` as it was. The temporary name
    keeps the suffix (matplotlib and ``np.savez`` choose the format by it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`, flushed to disk before the rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def positive_number(text: str) -> float:
    """An ``argparse`` type: a positive, finite number (``--lowmem-mb``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: a count such as ``--queries`` or ``--depth`` (0 and negatives
    are refused rather than read as "all" or sliced from the end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def port(text: str) -> int:
    """An ``argparse`` type: a TCP port, 1 to 65535 (checked before any model loads)."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """An ``argparse`` type: a comma-separated list of positive integers (``1,5``)."""
    return [positive_int(t.strip()) for t in text.split(",") if t.strip()]


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in (0, 1], such as a target precision."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def option_pair(text: str) -> tuple[str, Any]:
    """An ``argparse`` type: ``--option key=value``, the value read as JSON where it parses
    (``pruning=false`` gives ``("pruning", False)``), else kept as a string."""
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def exits_on(*kinds: type[BaseException]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command line's ``main``: an :class:`EdgerankError`, or one of ``kinds``,
    becomes one ``error: ...`` line on stderr and exit status 2 instead of a traceback."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except (EdgerankError, *kinds) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """``rows`` under ``header`` in aligned columns; columns in ``right`` are right-aligned."""
    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), *map(line, rows)])
