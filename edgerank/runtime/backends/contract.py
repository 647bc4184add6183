"""The backend contract: what ``Reranker`` needs of a backend, and the ``Scores`` it answers with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgerank.runtime.tokenization import EncodedBatch, Tokenizer


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
