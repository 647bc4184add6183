"""edgerank in other frameworks' reranker slots: ``edgerank.integrations.langchain`` (a
LangChain document compressor) and ``edgerank.integrations.llama_index`` (a LlamaIndex
node postprocessor). Both are tools on top of the public API: they reach edgerank only
through ``edgerank.Reranker``, and each needs its extra (``edgerank[langchain]``,
``edgerank[llama-index]``).

This module holds what they share: one loaded model per ``(model, backend, options)``
for the whole process, so two compressors (or a compressor and a postprocessor) built
with the same settings do not load the model twice."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from edgerank import Reranker

_shared: dict[tuple, Reranker] = {}
_shared_lock = threading.Lock()


def shared_reranker(model: str | Path | None = None, backend: str | None = None,
                    options: dict[str, Any] | None = None) -> Reranker:
    """The process's one :class:`edgerank.Reranker` for these settings, loaded on first
    use and kept for the life of the process (close it only when no integration will
    rank with it again). A ``Reranker`` serialises its calls, so sharing it between
    threads is safe."""
    options = dict(options or {})
    key = (str(model), backend, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _shared_lock:  # two threads asking at once must not load it twice
        reranker = _shared.get(key)
        if reranker is None:
            reranker = _shared[key] = Reranker(model=model, backend=backend, **options)
        return reranker
