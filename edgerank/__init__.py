"""edgerank: on-device quantized reranking. ``edgerank.rank(query, documents, top_k=...)``."""

from edgerank.api import CallStats, Ranking, RankResult, Reranker, rank
from edgerank.errors import (
    BackendUnavailableError,
    EdgerankError,
    MissingExtraError,
    ModelFormatError,
    ModelNotFoundError,
    OfflineError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "rank", "Reranker", "RankResult", "Ranking", "CallStats",
    "EdgerankError", "ModelNotFoundError", "ModelFormatError", "UnsupportedModelError",
    "BackendUnavailableError", "MissingExtraError", "OfflineError",
]
