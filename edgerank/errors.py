"""The errors edgerank raises on bad input, each a subclass of a builtin users already catch;
the small checks shared by the API and the command lines (integers, counts, outputs that
would overwrite an input); and how the command lines report them."""

from __future__ import annotations

import argparse
import functools
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable


class EdgerankError(Exception):
    """Base class of edgerank's own errors."""


class ModelNotFoundError(EdgerankError, FileNotFoundError):
    """``model=`` names nothing that exists: no path, no built-in, or a missing pull."""


class ModelFormatError(EdgerankError, ValueError):
    """The path exists but is not a model edgerank can read (or is corrupt)."""


class UnsupportedModelError(EdgerankError, ValueError):
    """A readable model whose architecture or family edgerank does not support."""


class BackendUnavailableError(EdgerankError, RuntimeError):
    """The backend cannot run here: a missing optional dependency, or the model's format."""


class MissingExtraError(BackendUnavailableError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install 'edgerank[EXTRA]'``)."""


class OfflineError(EdgerankError, ConnectionError):
    """A download was needed and the network (or the hub) cannot be reached."""


class ConfigError(EdgerankError, ValueError):
    """A settings file edgerank was asked to write into holds something it cannot read."""


class OutputOverlapError(EdgerankError, ValueError):
    """An output path is one of the command's inputs, or a folder holding one: replacing
    it (even with ``--force``) would destroy what is being read."""


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


class OutputLocationError(EdgerankError, OSError):
    """An output (or the cache) cannot be written where it was asked: a parent that is a
    file, a folder this process may not write into. Raised before any work."""


class OptionError(EdgerankError, TypeError):
    """An option the chosen backend does not take."""


class DataError(EdgerankError, ValueError):
    """An evaluation collection or run that cannot give what was asked, e.g. no judged query."""


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer, False for ``bool`` (an int subclass no count
    should be) and for everything else, floats included."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a real number (int, float, numpy scalar) that is not ``bool`` and not NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


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
