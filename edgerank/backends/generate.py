"""Greedy generation through an edgerank artifact: a decoder reranker explains its verdict.

Used by ``LayerwiseBackend.explain`` for the top-K survivors of a call, never for the
candidates pruning dropped. For one candidate::

    past = the shared prefix's keys/values (kept from the scoring pass)
    extend(candidate tokens)             -> label logits -> the verdict token (argmax)
    extend(verdict + spec.explain_prompt)
    repeat: next = argmax(LM head(final norm(last hidden))); extend([next])
        until a stop string of the spec, or ``max_tokens``

``extend`` runs new tokens through every layer graph with ``past`` = prefix K/V + this
candidate's own K/V so far (the graph returns the new tokens' keys/values, which are
appended). The layer graph takes its past as one sequence (``past_key`` is
``[1,KVH,1,P,D]``, and the attention mask covers only the new tokens), so candidates with
different pasts cannot share a decode step: the K survivors are decoded one after
another. Time grows with K and ``max_tokens``, not with the number of candidates; memory
holds one candidate's keys/values at a time, besides the prefix's.

The LM head is the artifact's memory-mapped table (the embedding for tied models,
``lm_head.npy`` otherwise), multiplied block by block, so no fp32 copy of it is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerank import layout
from edgerank.artifact import Artifact
from edgerank.errors import ModelFormatError

NEG = np.float32(-1e9)
LM_BLOCK_ROWS = 4096  # rows of the LM head dequantised at once (4096 x hidden fp32)


@dataclass
class Generated:
    """One candidate's generation: the verdict token, the generated ids (a final stop token
    included), and their text up to the first stop string."""

    verdict: int
    tokens: list[int]
    text: str


def lm_head_files(artifact: Artifact) -> tuple[Path, Path | None]:
    """The artifact's full LM head table (and its int8 scales, if any).

    Untied decoders carry ``lm_head.npy``; tied ones use the embedding table. An artifact
    written before explanations has no ``tied_embeddings`` entry: it is taken as tied when
    its stored label rows equal the embedding's rows within int8 rounding, and refused
    otherwise (it lacks the LM head: re-convert it)."""
    files = artifact.manifest.get("files") or {}
    path = artifact.path
    if layout.LM_HEAD in files:
        scale = path / layout.LM_HEAD_SCALE
        return path / layout.LM_HEAD, scale if layout.LM_HEAD_SCALE in files else None
    tied = artifact.dims.get("tied_embeddings")
    if tied is None:
        head = artifact.head()
        table = np.load(path / layout.EMBED, mmap_mode="r")
        ids = head["label_ids"]
        emb = np.asarray(table[ids], dtype=np.float32)
        if (path / layout.EMBED_SCALE).is_file():
            emb *= np.load(path / layout.EMBED_SCALE)[ids, None]
        rows = head["rows"]
        # int8 absmax rounding moves an element by at most max|row| / 254
        tol = np.abs(rows).max(axis=1, keepdims=True) / 100 + 1e-6
        tied = bool(emb.shape == rows.shape and np.all(np.abs(emb - rows) <= tol))
    if not tied:
        raise ModelFormatError(
            f"{path}: this artifact stores no full LM head (it was converted before explanations "
            f"existed, and its model does not tie the LM head to the embedding); re-convert it to explain")
    scale = path / layout.EMBED_SCALE
    return path / layout.EMBED, scale if scale.is_file() else None


class LMHead:
    """Full-vocabulary logits of a final hidden state, read block by block from a
    memory-mapped int8 (with per-row scales) or fp32 table."""

    def __init__(self, table: Path, scales: Path | None, norm: np.ndarray, eps: float) -> None:
        self.table = np.load(table, mmap_mode="r")
        self.scales = np.load(scales) if scales is not None else None
        self.norm = norm.astype(np.float32)
        self.eps = np.float32(eps)

    def normed(self, h: np.ndarray) -> np.ndarray:
        """The final RMSNorm, as the scoring head applies it."""
        h = h.astype(np.float32)
        return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps) * self.norm

    def argmax(self, h: np.ndarray) -> int:
        """The greedy next token for the last hidden state ``h`` [H]."""
        x = self.normed(h)
        best, best_id = -np.inf, 0
        for start in range(0, self.table.shape[0], LM_BLOCK_ROWS):
            logits = np.asarray(self.table[start: start + LM_BLOCK_ROWS], dtype=np.float32) @ x
            if self.scales is not None:
                logits *= self.scales[start: start + LM_BLOCK_ROWS]
            j = int(np.argmax(logits))  # first maximum, as torch's argmax on CPU
            if logits[j] > best:
                best, best_id = float(logits[j]), start + j
        return best_id


class Generator:
    """Greedy decoding for one artifact, sharing the scoring backend's layer sessions,
    embedding rows and rotary table (no second copy of any weight)."""

    def __init__(self, backend) -> None:
        self.b = backend
        table, scales = lm_head_files(backend.artifact)
        head = backend.head.weights
        self.lm = LMHead(table, scales, head["norm"], float(backend.artifact.dims["norm_eps"]))
        self.label_ids = [int(i) for i in head["label_ids"]]
        self.label_rows = head["rows"]
        spec = backend.spec
        if not spec.explain_prompt:
            raise ValueError(f"the {spec.family!r} family has no explain prompt")
        self.prompt_ids = backend.tokenizer.encode(spec.explain_prompt)
        self.stops = spec.explain_stop
        self.stop_ids = {ids[0] for ids in map(backend.tokenizer.encode, self.stops) if len(ids) == 1}

    def _extend(self, cache: list, prefix: list, tokens: list[int], start: int) -> np.ndarray:
        """Run ``tokens`` (at positions ``start``...) through every layer after ``prefix`` +
        ``cache`` (per layer (key, value)); appends their keys/values to ``cache``; returns
        the last token's final hidden state."""
        b = self.b
        T = len(tokens)
        x = b.embed.rows(np.asarray(tokens, dtype=np.int64))[None]
        cos, sin = b.rope(start + np.arange(T)[None])
        mask = np.triu(np.full((T, T), NEG, np.float32), 1)[None, None, None]
        L = b.artifact.n_layers
        b.layers.prefetch(0)
        for layer in range(L):
            sess = b.layers.get(layer)
            b.layers.prefetch(layer + 1)
            pk, pv = prefix[layer] if prefix else b._no_past
            if cache[layer] is not None:
                pk = np.concatenate([pk, cache[layer][0]], axis=3)
                pv = np.concatenate([pv, cache[layer][1]], axis=3)
            x, k, v = sess.run(None, {layout.HIDDEN: x, layout.COS: cos, layout.SIN: sin, layout.MASK: mask,
                                      layout.PAST_KEY: pk, layout.PAST_VALUE: pv})
            if cache[layer] is None:
                cache[layer] = (k, v)
            else:
                cache[layer] = (np.concatenate([cache[layer][0], k], axis=3),
                                np.concatenate([cache[layer][1], v], axis=3))
            b.layers.done(layer)
        return x[0, -1]

    def prefix_cache(self, prefix_tokens: list[int], kept: list | None) -> list:
        """Per-layer prefix keys/values: those the scoring pass kept, else computed here
        (a call that ended before the last layer, or ran without a shared prefix)."""
        L = self.b.artifact.n_layers
        if kept is not None and len(kept) == L:
            return kept
        cache: list = [None] * L
        if prefix_tokens:
            self._extend(cache, [], prefix_tokens, 0)
        return cache if prefix_tokens else []

    def generate(self, prefix: list, prefix_len: int, own: list[int], max_tokens: int) -> Generated:
        """Verdict and greedy rationale of one candidate whose tokens after the prefix are ``own``."""
        cache: list = [None] * self.b.artifact.n_layers
        h = self._extend(cache, prefix, own, prefix_len)
        verdict = self.label_ids[int(np.argmax(self.label_rows @ self.lm.normed(h)))]
        forced = [verdict] + self.prompt_ids
        pos = prefix_len + len(own)
        h = self._extend(cache, prefix, forced, pos)
        pos += len(forced)
        tokens: list[int] = []
        tok = self.b.tokenizer
        text = ""
        for step in range(max_tokens):
            nxt = self.lm.argmax(h)
            tokens.append(nxt)
            text = tok.decode(tokens)
            if nxt in self.stop_ids or any(s in text for s in self.stops):
                break
            if step + 1 < max_tokens:
                h = self._extend(cache, prefix, [nxt], pos)
                pos += 1
        for s in self.stops:  # the text ends before the first stop string
            text = text.split(s, 1)[0]
        return Generated(verdict, tokens, text.strip())


def explain_rows(backend, batch, rows: list[int], max_tokens: int, kept_prefix: list | None) -> tuple[list, dict]:
    """Generations for candidates ``rows`` of ``batch`` (one after another), and stats."""
    t0 = time.perf_counter()
    gen = Generator(backend)
    P = batch.prefix_len
    prefix = gen.prefix_cache(batch.sequences[0][:P] if rows else [], kept_prefix)
    out = [gen.generate(prefix, P, batch.sequences[r][P:], max_tokens) for r in rows]
    return out, {"explain_s": time.perf_counter() - t0, "explain_tokens": sum(len(g.tokens) for g in out),
                 "explained": len(rows), "prefix_reused": kept_prefix is not None
                 and len(kept_prefix) == backend.artifact.n_layers}
