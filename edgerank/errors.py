"""The errors edgerank raises on bad input, each a subclass of a builtin users already catch,
and the type checks the API's arguments share (``is_int``, ``is_number``)."""

from __future__ import annotations

import numbers
from typing import Any


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
