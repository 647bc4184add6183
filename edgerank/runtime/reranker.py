"""The runtime's ``Reranker`` (over a resolved model), ``RankResult``, ``Ranking`` and per-call ``CallStats``.

Data flow of one call: validate input -> ``tokenization.encode_pairs`` (template and
truncation from the model spec) -> ``tokenization.distinct`` (identical candidates once)
-> ``backend.score`` -> sort -> ``Ranking``.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgerank.errors import OptionError, is_int
from edgerank.runtime.backends import Backend, default_backend, load_backend
from edgerank.runtime.explain import Explanation, extractive
from edgerank.runtime.memory import PeakRSS
from edgerank.runtime.sources import ModelSource, check_max_length
from edgerank.runtime.specs import SPECS
from edgerank.runtime.tokenization import distinct, encode_pairs


@dataclass(frozen=True)
class RankResult:
    """One ranked document: its position in the input list, its score and its text."""

    index: int
    score: float
    document: str
    provisional: bool = False  # scored at an intermediate layer, then pruned (edgerank backend)
    explanation: Explanation | None = None  # rank(..., explain=True): for the top-K results only


@dataclass
class CallStats:
    """What one ``rank()`` call did and cost."""

    backend: str
    model: str
    candidates: int = 0
    duplicates: int = 0  # candidates identical to an earlier one: scored once, same score
    tokens: int = 0  # tokens scored, all distinct sequences together
    prefix_tokens: int = 0  # tokens of the shared template+query prefix, per candidate
    truncated: list[int] = field(default_factory=list)  # indices of truncated documents
    wall_s: float = 0.0
    encode_s: float = 0.0
    score_s: float = 0.0
    peak_rss_mb: float = 0.0  # largest RSS sampled during the call (edgerank.runtime.memory.PeakRSS)
    rss_delta_mb: float = 0.0  # peak above the RSS at the start of the call
    explain_s: float = 0.0  # explain=True: time spent explaining (inside wall_s)
    explain_tokens: int = 0  # tokens generated (decoders) for the explanations
    explained: int = 0  # distinct candidates explained (the top K, never the others)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific figures, over the distinct candidates


class Ranking(list):
    """The ranked results (a ``list[RankResult]``, best first) plus the call's ``stats``."""

    def __init__(self, results: Sequence[RankResult], stats: CallStats) -> None:
        super().__init__(results)
        self.stats = stats


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing but whitespace, control and format characters (NUL,
    zero-width spaces, BOMs): nothing a model could rank against."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def check_call(query: Any, documents: Any, top_k: Any) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, not {type(query).__name__}")
    if is_blank(query):
        raise ValueError("query is empty (only blank, control or format characters): there is nothing "
                         "to rank against")
    if isinstance(documents, (str, bytes)):
        raise TypeError(f"documents must be a list of str (got a single {type(documents).__name__})")
    if not isinstance(documents, Sequence):  # results index into it, so an iterator will not do
        raise TypeError(f"documents must be a list of str (got a {type(documents).__name__}; "
                        "pass list(...) of it)")
    for i, d in enumerate(documents):
        if not isinstance(d, str):
            raise TypeError(f"documents[{i}] is a {type(d).__name__}, not a str")
    if top_k is not None and not is_int(top_k):
        raise TypeError(f"top_k must be an int or None, not {type(top_k).__name__}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive (got {top_k}); use None for all documents")


def check_instruction(spec: Any, instruction: Any) -> None:
    """An instruction the model's prompt has no place for is an error, not silently dropped."""
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str or None, not {type(instruction).__name__}")
    if instruction is not None and not spec.takes_instruction:
        slots = ", ".join(f for f, s in SPECS.items() if s.takes_instruction)
        raise ValueError(f"the {spec.family!r} family takes no instruction "
                         f"(only prompts with an instruction slot do: {slots})")


class Reranker:
    """A loaded reranker over an already-resolved model: load once, rank many times.

    ``Reranker(source, backend=None, instruction=None, max_length=None, **backend_options)``.
    ``source`` is a :class:`ModelSource` (``sources.source_at(path)``); the ``edgerank``
    backend runs artifacts only. ``edgerank.Reranker(model=NAME)`` is the front door that
    resolves names and converts on first use, then builds this.

    Calls are serialised by a lock: a ``Reranker`` is safe to share between threads, one
    call runs at a time (each call already uses every core).
    """

    def __init__(self, source: ModelSource, backend: str | None = None, instruction: str | None = None,
                 max_length: int | None = None, **backend_options: Any) -> None:
        check_max_length(source, max_length)
        check_instruction(source.spec, instruction)
        self.source = source
        self.backend_name = default_backend(source) if backend is None else backend
        self.instruction = instruction
        self.max_length = max_length
        self._backend: Backend | None = load_backend(self.backend_name, source, **backend_options)
        self._lock = threading.Lock()
        self.last_stats: CallStats | None = None

    @property
    def spec(self):
        return self.source.spec

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
             instruction: str | None = None, explain: bool = False, explain_tokens: int = 48) -> Ranking:
        """Rank ``documents`` for ``query``, best first; at most ``top_k`` results.

        ``top_k=None`` or a ``top_k`` above the number of documents returns them all. An
        empty list returns an empty ranking. Equal scores keep input order.
        ``explain=True`` gives each returned result an ``explanation`` (docs/explain.md):
        decoders write one (greedy, at most ``explain_tokens`` tokens, edgerank backend);
        encoders point at the document's sentence they score highest.
        """
        check_call(query, documents, top_k)
        check_instruction(self.spec, instruction)
        generate = bool(explain) and self.spec.kind == "decoder"
        if explain:
            if not is_int(explain_tokens) or explain_tokens < 1:
                raise ValueError(f"explain_tokens must be a positive int (got {explain_tokens!r})")
            if generate and not hasattr(self._backend, "explain"):
                raise OptionError(f"explain=True for a decoder reranker generates through the artifact: "
                                  f"it runs on backend='edgerank', not {self.backend_name!r}")
        stats = CallStats(backend=self.backend_name, model=self.source.name, candidates=len(documents))
        if not documents:
            self.last_stats = stats
            return Ranking([], stats)
        with self._lock:  # held through explaining too: it reuses this call's prefix keys/values
            return self._rank(query, documents, top_k, instruction, explain, explain_tokens, generate, stats)

    def _rank(self, query: str, documents: Sequence[str], top_k: int | None, instruction: str | None,
              explain: bool, explain_tokens: int, generate: bool, stats: CallStats) -> Ranking:
        with PeakRSS() as mem:
            if self._backend is None:
                raise RuntimeError("this Reranker is closed")
            t0 = time.perf_counter()
            batch = encode_pairs(self.spec, self._backend.tokenizer, query, documents,
                                 instruction or self.instruction, self.max_length)
            unique, copy_of = distinct(batch)
            t1 = time.perf_counter()
            out = (self._backend.score(unique, top_k=top_k, keep_prefix_kv=True) if generate
                   else self._backend.score(unique, top_k=top_k))
            scores, tier, provisional = np.asarray(out.values, dtype=np.float64), out.tier, out.provisional
            stats.extra = out.stats
            t2 = time.perf_counter()
        if scores.shape != (len(unique.sequences),) or not np.all(np.isfinite(scores)):
            raise RuntimeError(f"backend {self.backend_name!r} returned invalid scores {scores!r}")
        # every copy of a candidate takes its one score; a top-K of the distinct candidates
        # holds every candidate of the top-K of all, so pruning stays safe
        scores, tier, provisional = scores[copy_of], np.asarray(tier)[copy_of], np.asarray(provisional)[copy_of]
        if "layers" in stats.extra:  # per input document, for callers (the server) that show what pruning dropped
            n_layers = int(stats.extra["layers"])
            stats.extra["document_scores"] = scores.tolist()
            stats.extra["dropped_before_layer"] = [n_layers + 1 - int(t) if t else None for t in tier]
        # pruned candidates (tier > 0) rank below the top-K whatever their provisional score
        order = np.lexsort((-scores, tier))[: top_k or len(documents)]
        explanations: dict[int, Explanation | None] = {}
        if explain:  # the returned results only: whatever pruning dropped is never explained
            explanations = self._explain(query, documents, order, copy_of, unique, generate,
                                         instruction or self.instruction, explain_tokens, stats)
        stats.tokens, stats.prefix_tokens, stats.truncated = unique.n_tokens, batch.prefix_len, batch.truncated
        stats.duplicates = len(documents) - len(unique.sequences)
        stats.encode_s, stats.score_s, stats.wall_s = t1 - t0, t2 - t1, t2 - t0 + stats.explain_s
        stats.peak_rss_mb, stats.rss_delta_mb = mem.peak_mb, mem.delta_mb
        self.last_stats = stats
        return Ranking([RankResult(int(i), float(scores[i]), documents[i], bool(provisional[i]),
                                   explanations.get(copy_of[i])) for i in order], stats)

    def _explain(self, query: str, documents: Sequence[str], order: np.ndarray, copy_of: list[int], unique,
                 generate: bool, instruction: str | None, explain_tokens: int,
                 stats: CallStats) -> dict[int, Explanation | None]:
        """Explanations of the results in ``order``, by distinct candidate (copies share one)."""
        t0 = time.perf_counter()
        rows = list(dict.fromkeys(copy_of[i] for i in order))  # distinct candidates, best first
        first = {copy_of[i]: int(i) for i in reversed(order)}  # a document of each distinct candidate
        if generate:
            gens, gstats = self._backend.explain(unique, rows, explain_tokens)
            tok = self._backend.tokenizer
            out = {r: Explanation(g.text, "generated", verdict=tok.decode([g.verdict]),
                                  token_ids=tuple(g.tokens))
                   for r, g in zip(rows, gens)}
            stats.explain_tokens = int(gstats["explain_tokens"])
            stats.extra["explain"] = gstats
        else:
            docs = [documents[first[r]] for r in rows]
            out = dict(zip(rows, extractive(self._backend, self.spec, query, docs, instruction, self.max_length)))
        stats.explained = len(rows)
        stats.explain_s = time.perf_counter() - t0
        return out

    def check_query(self, query: str, instruction: str | None = None) -> None:
        """Raise what :meth:`rank` would raise for ``query`` (blank, empty once tokenized, too
        long to leave room for a document), having only tokenized it: a batch checks every
        query before it scores any."""
        check_call(query, [], None)
        check_instruction(self.spec, instruction)
        if self._backend is None:
            raise RuntimeError("this Reranker is closed")
        encode_pairs(self.spec, self._backend.tokenizer, query, [""], instruction or self.instruction, self.max_length)

    def score(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """Raw scores in input order (no sorting, no ``top_k``, so nothing is pruned)."""
        ranking = self.rank(query, documents)
        out = np.empty(len(documents))
        for r in ranking:
            out[r.index] = r.score
        return out

    def close(self) -> None:
        """Free the model's memory once a call in progress has finished; the Reranker
        cannot rank afterwards."""
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
