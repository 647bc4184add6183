"""Explanations for the top-K results of a call (``rank(..., explain=True)``).

- Decoder rerankers write one: the backend continues from the prompt and its verdict
  (``backends/generate.py``); the text is the :class:`Explanation`.
- Encoders (cross-encoders, bi-encoders) cannot generate: their explanation is extractive,
  the sentence of the document the model itself scores highest against the query, with
  its character offsets in the original document text (``document[start:end] == text``).
  All sentences of the K documents are scored in one backend call, nothing pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgerank.runtime.tokenization import encode_pairs

# A sentence: a run up to (and with) closing punctuation followed by a space, or a line. Abbreviations
# may split a sentence early; the rationale is then a shorter span, still with true offsets.
_SENTENCE = re.compile(r"[^\n]+?(?:[.!?]+[\"')\]]*(?=\s|$)|(?=\n)|$)")


@dataclass(frozen=True)
class Explanation:
    """Why a result ranks where it does.

    ``kind`` is ``"generated"`` (a decoder's own words; ``start``/``end`` are None) or
    ``"extractive"`` (``text`` is ``document[start:end]``). ``verdict`` is the decoder's
    answer label the rationale follows (``"yes"``, ``" true"``, ``"2"``...); ``token_ids``
    the tokens generated (a final stop token included); ``score`` the encoder's score of
    the extracted span."""

    text: str
    kind: str
    start: int | None = None
    end: int | None = None
    verdict: str | None = None
    token_ids: tuple[int, ...] = ()
    score: float | None = None


def sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, whitespace trimmed;
    a text with no sentence break is one span (empty text: none)."""
    spans = []
    for m in _SENTENCE.finditer(text):
        a, b = m.start(), m.end()
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            spans.append((a, b))
    return spans


def extractive(backend, spec, query: str, documents: Sequence[str], instruction: str | None,
               max_length: int | None) -> list[Explanation | None]:
    """For each document, its sentence the model scores highest against ``query`` (ties:
    the first); None for a document with no text."""
    spans = [sentences(d) for d in documents]
    texts = [documents[i][a:b] for i, s in enumerate(spans) for a, b in s]
    if not texts:
        return [None] * len(documents)
    batch = encode_pairs(spec, backend.tokenizer, query, texts, instruction, max_length)
    scores = np.asarray(backend.score(batch, top_k=None).values, dtype=np.float64)
    out: list[Explanation | None] = []
    at = 0
    for i, s in enumerate(spans):
        if not s:
            out.append(None)
            continue
        j = int(np.argmax(scores[at: at + len(s)]))
        a, b = s[j]
        out.append(Explanation(documents[i][a:b], "extractive", a, b, score=float(scores[at + j])))
        at += len(s)
    return out
