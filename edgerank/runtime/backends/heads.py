"""What differs between model kinds in the layer-wise runtime, one object per kind: how
token ids become the first hidden states, and how the head turns hidden states into scores
(at the last layer, and at every pruning check before it).

- :class:`DecoderHead`: rows are candidates; a candidate's last token goes through the
  final RMSNorm and the answer-label rows of the LM head.
- :class:`CrossEncoderHead`: BERT embeddings (positions, token types, LayerNorm); the
  [CLS] state goes through pooler and classifier.
- :class:`BiEncoderHead`: BERT embeddings; the mean-pooled state of each candidate against
  the query's, by cosine. The query is row 0 (``query_rows = 1``), as on every backend.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from edgerank.runtime.artifact import Artifact
from edgerank.runtime.specs import ModelSpec

# The head's matmuls are small numpy work between layers. Run on numpy's BLAS pool, they
# leave its worker threads spinning for a while after each call, taking the cores from the
# next layer's ONNX Runtime threads (a fifth slower per layer after a pruning check, bench/
# RESULTS.md §10.4), so they run on one BLAS thread.
_BLAS = ThreadpoolController()


class DecoderHead:
    """Decoder rerankers: last-token state -> RMSNorm -> label rows -> score formula."""

    query_rows = 0  # rows before the candidates (the query's own sequence)

    def __init__(self, artifact: Artifact, spec: ModelSpec) -> None:
        self.weights = artifact.head()
        self.spec = spec
        self.eps = np.float32(artifact.dims["norm_eps"])

    def embed(self, rows: np.ndarray, type_ids: list[int] | None) -> np.ndarray:
        """First hidden states of one sequence from its token-embedding ``rows``."""
        return rows

    def pooled(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return np.stack([states[i][-1] for i in rows])

    @_BLAS.wrap(limits=1, user_api="blas")
    def scores(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Scores of candidate ``rows`` (indices into ``states``) from their current states."""
        x = self.pooled(states, rows).astype(np.float32)
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weights["norm"]
        return self.spec.score.apply(x @ self.weights["rows"].T)


class _EncoderHead(DecoderHead):
    """BERT-style embeddings: token rows + positions (+ token types), then LayerNorm."""

    def __init__(self, artifact: Artifact, spec: ModelSpec) -> None:
        super().__init__(artifact, spec)
        self.position_offset = int(artifact.dims.get("position_offset", 0))

    def embed(self, rows: np.ndarray, type_ids: list[int] | None) -> np.ndarray:
        return bert_embeddings(rows, type_ids, self.weights, self.position_offset, self.eps)


def bert_embeddings(rows: np.ndarray, type_ids: list[int] | None, head: dict[str, np.ndarray],
                    position_offset: int, eps: float) -> np.ndarray:
    """A BERT-style encoder's first hidden states of one sequence: its token-embedding
    ``rows`` + positions (+ token types), then the embedding LayerNorm (weights in ``head``)."""
    x = rows + head["position"][position_offset: position_offset + len(rows)]
    if "token_type" in head:
        x = x + head["token_type"][np.asarray(type_ids if type_ids is not None else [0] * len(rows))]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * head["ln_weight"] + head["ln_bias"]).astype(np.float32)


class CrossEncoderHead(_EncoderHead):
    """Cross-encoders: [CLS] state -> pooler (tanh) -> classifier -> score formula."""

    def pooled(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return np.stack([states[i][0] for i in rows])

    @_BLAS.wrap(limits=1, user_api="blas")
    def scores(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        h = self.weights
        pooled = np.tanh(self.pooled(states, rows) @ h["pool_weight"].T + h["pool_bias"])
        return self.spec.score.apply(pooled @ h["cls_weight"].T + h["cls_bias"])


class BiEncoderHead(_EncoderHead):
    """Bi-encoders: cosine of each candidate's mean-pooled state with the query's (row 0)."""

    query_rows = 1

    def pooled(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return np.stack([states[i].mean(0) for i in rows])

    @_BLAS.wrap(limits=1, user_api="blas")
    def scores(self, states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return self.spec.score.apply(self.pooled(states, rows), query=states[0].mean(0))


def head_for(artifact: Artifact, spec: ModelSpec) -> DecoderHead:
    """The head object of the artifact's model kind."""
    kinds = {"decoder": DecoderHead, "cross-encoder": CrossEncoderHead, "bi-encoder": BiEncoderHead}
    return kinds[spec.kind](artifact, spec)
