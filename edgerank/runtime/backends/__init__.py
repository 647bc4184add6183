"""Choosing and loading a backend (the contract each one keeps is ``contract.Backend``).

Every backend turns one query's ``EncodedBatch`` into ``Scores``. A bi-encoder batch runs
the query's own sequence as row 0 and the candidates after it, on every backend, and every backend leaves the score itself (cosine
included) to the spec's :class:`~edgerank.runtime.specs.ScoreFormula`. Backends are imported on
demand, so ``import edgerank`` never pulls in torch or llama.cpp.
"""

from __future__ import annotations

import inspect

from edgerank.errors import OptionError
from edgerank.runtime.backends.contract import Backend
from edgerank.runtime.extras import require
from edgerank.runtime.sources import ModelSource

BACKENDS = ("edgerank", "reference", "llamacpp")


def default_backend(source: ModelSource) -> str:
    """The backend a model runs on when none is named: ``edgerank`` for artifacts,
    ``llamacpp`` for GGUF files, ``reference`` for HF folders. (Built-in models run on
    ``edgerank``: ``edgerank.models.supply.default_backend``.)"""
    if source.kind == "artifact":
        return "edgerank"
    if source.kind == "gguf":
        return "llamacpp"
    return "reference"


def check_options(name: str, options: dict) -> type:
    """The class of backend ``name``, once ``options`` are known to be its own: an unknown
    backend is a ValueError, an option it does not take an :class:`OptionError`, a missing
    extra a :class:`MissingExtraError`; all before any work."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    cls = _backend_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "source")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"backend {name!r} takes no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(accepted)}")
    return cls


def load_backend(name: str, source: ModelSource, **options) -> Backend:
    """Backend ``name`` on ``source``. The ``edgerank`` backend runs edgerank artifacts:
    ``edgerank.Reranker(model=...)`` converts any other model to one on first use."""
    cls = check_options(name, options)
    if name == "edgerank" and source.kind != "artifact":
        raise ValueError(f"backend 'edgerank' runs edgerank artifacts, and {source.path} is a "
                         f"{'GGUF file' if source.kind == 'gguf' else 'Hugging Face folder'}: load it with "
                         "edgerank.Reranker(model=...), which converts it on first use, or convert it with "
                         "python -m edgerank.converters")
    return cls(source, **options)


def _backend_class(name: str) -> type:
    if name == "edgerank":
        from edgerank.runtime.backends.layerwise import LayerwiseBackend

        return LayerwiseBackend
    if name == "reference":
        require("reference", "backend 'reference'")
        from edgerank.runtime.backends.reference import ReferenceBackend

        return ReferenceBackend
    require("llamacpp", "backend 'llamacpp'")
    from edgerank.runtime.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend
