"""Greedy generation through an edgerank artifact: a decoder reranker explains its verdict.

Used by ``LayerwiseBackend.explain`` for the top-K survivors of a call, never for the
candidates pruning dropped. For one candidate::

    past = the shared prefix's keys/values (kept from the scoring pass)
    extend(candidate tokens)             -> label logits -> the verdict token (argmax)
    extend(verdict + spec.explain_prompt)
    repeat: next = argmax(LM head(final norm(last hidden))); extend([next])
        until a stop string of the spec, or ``max_tokens``

``extend`` runs new tokens through every layer graph with ``past`` = prefix K/V + the
candidates' own K/V so far (the graph returns the new tokens' keys/values, which are
appended). The K survivors decode as one batch (up to ``DECODE_ROWS`` rows): the prefix
is one shared ``[1,...]`` past until the rows have their own, then each row's past is
prefix + its own tokens, right-padded to the longest row, with the layer graph's
``past_mask`` input hiding the padding (``Cache``). A row that hits a stop leaves the
batch. Time grows with K and ``max_tokens``, not with the number of candidates; memory
holds the batch's own keys/values besides the prefix's. Artifacts converted before the
layer graphs took ``past_mask`` decode one candidate at a time.

The LM head is the artifact's table, read block by block (the embedding for tied models,
``lm_head.npy`` otherwise) and multiplied block by block, so no fp32 copy of it is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerank.errors import ModelFormatError
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.budget import decode_rows
from edgerank.runtime.embedding import TableFile

LM_BLOCK_ROWS = 4096  # rows of the LM head dequantised at once (4096 x hidden fp32)
DECODE_ROWS = 16  # candidates decoded together: their keys/values are held at once


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
        table = TableFile(path / layout.EMBED)
        ids = head["label_ids"]
        emb = np.asarray(table.rows(ids), dtype=np.float32)
        table.close()
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
        self.table = TableFile(table)  # read, not memory-mapped: a truncated file is an error, not SIGBUS
        self.scales = np.load(scales) if scales is not None else None
        self.norm = norm.astype(np.float32)
        self.eps = np.float32(eps)

    def normed(self, h: np.ndarray) -> np.ndarray:
        """The final RMSNorm, as the scoring head applies it."""
        h = h.astype(np.float32)
        return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps) * self.norm

    def argmax(self, h: np.ndarray) -> np.ndarray:
        """The greedy next token for each last hidden state of ``h`` [B,H] (one pass over
        the table for the whole batch)."""
        x = self.normed(h)  # [B,H]
        best = np.full(len(x), -np.inf, dtype=np.float32)
        best_id = np.zeros(len(x), dtype=np.int64)
        for start in range(0, self.table.shape[0], LM_BLOCK_ROWS):
            logits = np.asarray(self.table.block(start, start + LM_BLOCK_ROWS), dtype=np.float32) @ x.T  # [rows,B]
            if self.scales is not None:
                logits *= self.scales[start: start + LM_BLOCK_ROWS, None]
            j = np.argmax(logits, axis=0)  # first maximum, as torch's argmax on CPU
            top = logits[j, np.arange(len(x))]
            better = top > best
            best[better], best_id[better] = top[better], start + j[better]
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

    def batched(self) -> bool:
        """Whether the artifact's layer graphs take a mask over the past (``layer_inputs``
        in the manifest, written since batched decoding); older ones decode one candidate
        at a time."""
        return layout.PAST_MASK in (self.b.artifact.manifest.get("layer_inputs") or ())

    def _extend(self, cache: Cache, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Run ``tokens`` [B,T] (row b's first ``lengths[b]`` are real; the rest padding)
        through every layer after ``cache``'s past; appends their keys/values to ``cache``;
        returns each row's last real token's final hidden state [B,H]."""
        b = self.b
        B, T = tokens.shape
        x = b.embed.rows(tokens.reshape(-1)).reshape(B, T, -1)
        cos, sin = b.rope(cache.positions[:, None] + np.arange(T)[None])
        mask = layout.decoder_mask(lengths, T)
        past_mask = cache.past_mask()
        L = b.artifact.n_layers
        b.layers.prefetch(0)
        for layer in range(L):
            sess = b.layers.get(layer)
            b.layers.prefetch(layer + 1)
            x, k, v = sess.run(None, layout.decoder_inputs(x, cos, sin, mask, cache.past(layer), past_mask))
            cache.append(layer, k, v)
            b.layers.done(layer)
        cache.grow(T, lengths)
        return x[np.arange(B), lengths - 1]

    def prefix_cache(self, prefix_tokens: list[int], kept: list | None) -> list:
        """Per-layer prefix keys/values: those the scoring pass kept, else computed here
        (a call that ended before the last layer, or ran without a shared prefix)."""
        L = self.b.artifact.n_layers
        if kept is not None and len(kept) == L:
            return kept
        if not prefix_tokens:
            return []
        cache = Cache(self.b._no_past, L, 1, 0)
        self._extend(cache, np.asarray([prefix_tokens], dtype=np.int64), np.array([len(prefix_tokens)]))
        return [cache.past(layer) for layer in range(L)]

    def generate(self, prefix: list, prefix_len: int, owns: list[list[int]], max_tokens: int) -> list[Generated]:
        """Verdicts and greedy rationales of candidates whose tokens after the prefix are
        ``owns``, decoded as one batch (each row stops on its own)."""
        B = len(owns)
        lengths = np.array([len(o) for o in owns])
        tokens = np.zeros((B, int(lengths.max())), np.int64)
        for i, o in enumerate(owns):
            tokens[i, : len(o)] = o
        cache = Cache(prefix if prefix else self.b._no_past, self.b.artifact.n_layers, B, prefix_len)
        h = self._extend(cache, tokens, lengths)
        normed = self.lm.normed(h)
        verdicts = [self.label_ids[int(np.argmax(self.label_rows @ row))] for row in normed]
        forced = np.array([[v] + self.prompt_ids for v in verdicts], dtype=np.int64)
        h = self._extend(cache, forced, np.full(B, forced.shape[1]))
        out = [Generated(v, [], "") for v in verdicts]
        live = np.arange(B)  # rows of ``out`` still generating, in cache row order
        tok = self.b.tokenizer
        for step in range(max_tokens):
            nxt = self.lm.argmax(h)
            going = []
            for j, r in enumerate(live):
                g = out[r]
                g.tokens.append(int(nxt[j]))
                g.text = tok.decode(g.tokens)
                if not (g.tokens[-1] in self.stop_ids or any(s in g.text for s in self.stops)):
                    going.append(j)
            if not going or step + 1 == max_tokens:
                break
            if len(going) < len(live):
                cache.keep(np.asarray(going))
                live, nxt, h = live[going], nxt[going], h[going]
            h = self._extend(cache, nxt[:, None].astype(np.int64), np.ones(len(live), np.int64))
        for g in out:
            for s in self.stops:  # the text ends before the first stop string
                g.text = g.text.split(s, 1)[0]
            g.text = g.text.strip()
        return out


class Cache:
    """Per-layer keys/values of a decoding batch: the shared prefix's (one copy, ``[1,...]``)
    followed by each row's own, right-padded to the longest row; ``valid`` marks which of a
    row's own positions are real, and ``positions`` where each row's next token goes."""

    def __init__(self, prefix: list | tuple, n_layers: int, rows: int, prefix_len: int) -> None:
        self.prefix = prefix if isinstance(prefix, list) else [prefix] * n_layers
        self.own: list = [None] * n_layers
        self.valid = np.zeros((rows, 0), dtype=bool)
        self.positions = np.full(rows, prefix_len, dtype=np.int64)

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's past keys and values: prefix, then the rows' own ([1,...] with no own yet)."""
        pk, pv = self.prefix[layer]
        if self.own[layer] is None:
            return pk, pv
        k, v = self.own[layer]
        B = k.shape[0]
        return (np.concatenate([np.broadcast_to(pk, (B,) + pk.shape[1:]), k], axis=3),
                np.concatenate([np.broadcast_to(pv, (B,) + pv.shape[1:]), v], axis=3))

    def past_mask(self) -> np.ndarray | None:
        """[B,1,1,1,P+own]: NEG over padding; None when nothing is padding (the graph's
        default: every past position visible; graphs from before batched decoding lack it)."""
        if self.valid.all():
            return None
        P = self.prefix[0][0].shape[3]
        seen = np.concatenate([np.ones((len(self.valid), P), dtype=bool), self.valid], axis=1)
        return np.where(seen, np.float32(0), layout.NEG)[:, None, None, None, :]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        if self.own[layer] is None:
            self.own[layer] = (k, v)
        else:
            ok, ov = self.own[layer]
            self.own[layer] = (np.concatenate([ok, k], axis=3), np.concatenate([ov, v], axis=3))

    def grow(self, T: int, lengths: np.ndarray) -> None:
        """Record ``T`` new positions per row, of which the first ``lengths[b]`` are real."""
        self.valid = np.concatenate([self.valid, np.arange(T)[None] < lengths[:, None]], axis=1)
        self.positions = self.positions + lengths

    def keep(self, rows: np.ndarray) -> None:
        """Drop every row but ``rows`` (finished generations)."""
        self.own = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.own]
        self.valid, self.positions = self.valid[rows], self.positions[rows]


def explain_rows(backend, batch, rows: list[int], max_tokens: int, kept_prefix: list | None) -> tuple[list, dict]:
    """Generations for candidates ``rows`` of ``batch``, decoded ``DECODE_ROWS`` at a time,
    fewer if the memory budget holds fewer (one at a time on artifacts whose layer graphs
    predate batched decoding), and stats."""
    t0 = time.perf_counter()
    gen = Generator(backend)
    P = batch.prefix_len
    prefix = gen.prefix_cache(batch.sequences[0][:P] if rows else [], kept_prefix)
    per_batch = 1
    if rows and gen.batched():
        own = max(len(batch.sequences[r]) - P for r in rows)
        per_batch = decode_rows(backend.shape, backend.plan, backend.max_memory_mb, own,
                                P + own + len(gen.prompt_ids) + 1 + max_tokens, min(DECODE_ROWS, len(rows)))
    # batches of similar lengths pad less (results do not depend on batch-mates, int8 form aside)
    order = sorted(range(len(rows)), key=lambda i: len(batch.sequences[rows[i]]))
    out: list = [None] * len(rows)
    for at in range(0, len(rows), per_batch):
        part = order[at: at + per_batch]
        for i, g in zip(part, gen.generate(prefix, P, [batch.sequences[rows[i]][P:] for i in part], max_tokens)):
            out[i] = g
    return out, {"explain_s": time.perf_counter() - t0, "explain_tokens": sum(len(g.tokens) for g in out),
                 "explained": len(rows), "decode_rows": per_batch, "prefix_reused": kept_prefix is not None
                 and len(kept_prefix) == backend.artifact.n_layers}
