"""What the command lines share: argument types, one ``error: ...`` line and exit status 2
instead of a traceback, the check that an output never replaces an input, and plain-text
tables (the tools print theirs with rich)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from edgerank.errors import EdgerankError, OutputOverlapError


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
