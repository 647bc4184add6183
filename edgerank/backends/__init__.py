"""The backend contract, and choosing and loading a backend.

Every backend is a :class:`Backend`: it turns one query's :class:`EncodedBatch` into
:class:`Scores`. A bi-encoder batch runs the query's own sequence as row 0 and the
candidates after it, on every backend, and every backend leaves the score itself (cosine
included) to the spec's :class:`~edgerank.specs.ScoreFormula`. Backends are imported on
demand, so ``import edgerank`` never pulls in torch or llama.cpp.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgerank.errors import OptionError
from edgerank.extras import require
from edgerank.sources import ModelSource
from edgerank.tokenization import EncodedBatch, Tokenizer

BACKENDS = ("edgerank", "reference", "llamacpp")


@dataclass
class Scores:
    """A backend's answer: scores in input order, plus how far each candidate got.

    ``tier`` orders candidates before ``values`` do: 0 for the top-K (and for everything
    when nothing was pruned); dropped candidates get 1 + the number of layers they missed,
    so one dropped later ranks above one dropped earlier. ``provisional`` marks scores
    taken from an intermediate layer. ``stats`` are the backend's own figures
    (``CallStats.extra``)."""

    values: np.ndarray
    tier: np.ndarray
    provisional: np.ndarray
    stats: dict = field(default_factory=dict)

    @classmethod
    def final(cls, values: np.ndarray, stats: dict | None = None) -> "Scores":
        """Scores of a backend that runs every candidate to the last layer."""
        n = len(values)
        return cls(np.asarray(values, dtype=np.float64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool),
                   stats or {})


class Backend(Protocol):
    """What ``Reranker`` needs of a backend."""

    name: str
    tokenizer: Tokenizer  # the tokenizer ``encode_pairs`` builds batches with

    def score(self, batch: EncodedBatch, top_k: int | None = None) -> Scores:
        """Scores of every candidate of ``batch``; ``top_k`` lets a pruning backend stop
        the others early (their tier says so)."""

    def close(self) -> None:
        """Free the model."""


def default_backend(source: ModelSource) -> str:
    """The backend a model runs on when none is named: ``edgerank`` for artifacts and
    built-in models, ``llamacpp`` for other GGUF files, ``reference`` for HF folders.
    Any model runs on ``edgerank`` when asked: it is converted to int4 on first use."""
    from edgerank.catalog import BUILTINS

    if source.kind == "artifact" or source.name in BUILTINS:
        return "edgerank"
    if source.kind == "gguf":
        return "llamacpp"
    return "reference"


def load_backend(name: str, source: ModelSource, **options) -> Backend:
    """Instantiate backend ``name`` for ``source``; unknown options are an error, raised
    before any work (an ``edgerank`` run of a non-artifact converts it first)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    cls = _backend_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "source")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"backend {name!r} takes no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(accepted)}")
    if name == "edgerank" and source.kind != "artifact":  # an HF folder, a GGUF or a built-in: its int4 artifact
        from edgerank import supply

        source = supply.artifact_source(source)
    return cls(source, **options)


def _backend_class(name: str) -> type:
    if name == "edgerank":
        from edgerank.backends.layerwise import LayerwiseBackend

        return LayerwiseBackend
    if name == "reference":
        require("reference", "backend 'reference'")
        from edgerank.backends.reference import ReferenceBackend

        return ReferenceBackend
    require("llamacpp", "backend 'llamacpp'")
    from edgerank.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend
