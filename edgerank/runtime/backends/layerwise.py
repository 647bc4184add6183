"""The layer-wise runtime (``backend="edgerank"``): monolithic batched forwarding of an
edgerank artifact on ONNX Runtime, with progressive cluster pruning.

One call (:meth:`LayerwiseBackend.score`)::

    token ids -> embedding rows (EmbeddingRows, LRU) -> head.embed -> first hidden states
    for each layer (LayerSessions: resident, or streamed two at a time):
        at a check: the artifact's readout for the layer (else head.scores) of the live
            candidates -> PruningRun.check
            -> selected / dropped / deferred
        decoders: the shared prefix (template + query) runs once; its keys/values feed
            every candidate
        the running rows go through the layer in length-sorted chunks under a token budget
    head.scores of the top-K -> Scores

What differs between decoders, cross-encoders and bi-encoders (embedding, pooling, the
head) lives in ``backends/heads.py``; a bi-encoder's query is row 0 and is never pruned.
Statistics and calibration recording watch the loop (:class:`CallCounters`,
:class:`LayerRecorder`) rather than branch inside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from edgerank.errors import ModelFormatError, is_int, is_number
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.backends.contract import Scores
from edgerank.runtime.backends.heads import _BLAS, head_for
from edgerank.runtime.budget import (
    EMBED_GROUP_BYTES,
    INT8_CHUNK_TOKENS,
    MB,
    OPENVINO_CHUNK_TOKENS,
    Call,
    Fit,
    MemoryBudgetError,
    Plan,
    Shape,
    first_fit,
    needed_mb,
    plan_call,
    plan_load,
    return_freed_memory,
    tokenizer_mb,
)
from edgerank.runtime.chunking import length_chunks, padded_width, width_chunks
from edgerank.runtime.compute import STACKED, Choice, choose
from edgerank.runtime.cpu import default_threads
from edgerank.runtime.embedding import EmbeddingRows
from edgerank.runtime.engines import OPENVINO, OPENVINO_WIDTH_STEP
from edgerank.runtime.pruning import RULES, PruningPolicy, PruningRun
from edgerank.runtime.readouts import Readouts
from edgerank.runtime.rope import RopeTable
from edgerank.runtime.sources import ModelSource
from edgerank.runtime.streaming import LayerSessions
from edgerank.runtime.tokenization import EncodedBatch, HFTokenizer


@dataclass
class CallCounters:
    """What one call did, counted as the loop goes: layer x token work, padding, time per
    stage, and how many layers each candidate ran."""

    n_layers: int
    n: int
    work: int = 0
    pad: int = 0
    embed_s: float = 0.0
    layers_s: float = 0.0
    run_s: float = 0.0  # of layers_s, inside ONNX Runtime (the rest: padding, masks, copies)
    prune_s: float = 0.0
    flop: float = 0.0  # the layer graphs' matmul and attention work as run (padding included)
    layers_done: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.layers_done = np.zeros(self.n, dtype=np.int64)


@dataclass
class LayerRecorder:
    """Every candidate's check score (what a pruning check would see: the readout where
    the artifact has one, else the head) before each layer 1..L-1, then the final scores
    (``record_layers=True``, which calibration replays through the pruning policy). With
    readouts, the head's own scores too; with ``record_states=True``, the pooled states a
    readout reads (what ``calibrate --fit-readouts`` fits on)."""

    states: bool = False
    rows: list = field(default_factory=list)
    head_rows: list = field(default_factory=list)
    pooled: list = field(default_factory=list)
    query: list = field(default_factory=list)

    def before_layer(self, layer: int, backend: "LayerwiseBackend", states: list, rows: np.ndarray) -> None:
        if layer == 0:
            return
        self.rows.append(backend._check_scores(layer, states, rows))
        if backend.readouts is not None:
            self.head_rows.append(backend.head.scores(states, rows))
        if self.states:
            self.pooled.append(backend.head.pooled(states, rows).astype(np.float32))
            if backend.head.query_rows:
                self.query.append(backend.head.pooled(states, np.arange(1))[0].astype(np.float32))

    def stats(self, final: np.ndarray, lengths: np.ndarray) -> dict:
        out = {"layer_scores": np.stack(self.rows + [final.copy()]),  # [L, n]
               "candidate_lengths": lengths}
        if self.head_rows:
            out["head_layer_scores"] = np.stack(self.head_rows + [final.copy()])
        if self.states:
            out["layer_pooled"] = np.stack(self.pooled)  # [L-1, n, H]: before layers 1..L-1
            if self.query:
                out["query_pooled"] = np.stack(self.query)  # [L-1, H]
        return out


class LayerwiseBackend:
    """The edgerank runtime behind the backend contract (``edgerank.runtime.backends.Backend``)."""

    name = "edgerank"

    def __init__(self, source: ModelSource, threads: int | None = None, stream_weights: bool | None = None,
                 max_memory_mb: float | None = None, pruning: bool = True, threshold: float | None = None,
                 min_depth: float | None = None, clusters: int | None = None, exact_order: bool = True,
                 shared_prefix: bool = True,
                 chunk_tokens: int | None = None, verify: bool = True, record_layers: bool = False,
                 readouts: bool = True, record_states: bool = False, rule: str | None = None,
                 keep: dict | None = None, margin: dict | None = None, compute: str | None = None) -> None:
        _check_options(threads, max_memory_mb, chunk_tokens)
        if record_layers and pruning:
            raise ValueError("record_layers=True needs pruning=False (every candidate through every layer)")
        self.artifact = Artifact.open(source.path, verify=verify)
        self.spec = source.spec
        self.tokenizer = HFTokenizer.from_file(self.artifact.path / layout.TOKENIZER)
        self.threads = int(threads or default_threads())
        dims = self.artifact.dims
        self.head = head_for(self.artifact, self.spec)
        # loaded (and so checked against this model) even when not used
        fitted = Readouts.load(self.artifact)
        self.readouts = fitted if readouts and fitted is not None and fitted.fitted.any() else None
        self.encoder = self.artifact.is_encoder
        _check_parts(self.artifact.path, self.spec, self.encoder, self.head.weights, dims["hidden"])
        self.max_memory_mb = max_memory_mb
        self.compute, self.shape, self.plan = self._form_and_plan(compute, stream_weights, chunk_tokens)
        # "No earlier tokens": the past K/V fed to the prefix pass, and to every chunk when no
        # shared prefix applies (decoders only).
        self._no_past = layout.no_past(self.shape.n_kv_heads, self.shape.head_dim)
        self.record_layers = record_layers  # keep every layer's check scores (calibration)
        self.record_states = bool(record_states)  # and the pooled states readouts read (fitting)
        # knobs: the call's options, else the artifact's calibrated values for the call's K
        # (``pruning.by_k``), else its main calibrated values, else the defaults
        calibrated = self.artifact.manifest.get("pruning") or {}
        given = {"threshold": threshold, "min_depth": min_depth, "clusters": clusters, "rule": rule, "keep": keep,
                 "margin": margin}
        where = f"{self.artifact.path / layout.MANIFEST}: pruning: "
        # a calibration that found pruning not worth it wrote it off, unless the caller chose knobs
        off = bool(calibrated.get("off")) and not any(v is not None for v in given.values())
        self.policy = _policy(given, calibrated, bool(pruning) and not off, exact_order, where)
        self._policy_by_k = _per_k_policies(calibrated.get("by_k") or {}, given, calibrated, bool(pruning),
                                            exact_order, where)
        self.shared_prefix = bool(shared_prefix) and not self.encoder
        self.embed = _embedding(self.artifact, self.plan.cache_rows)
        if not self.encoder:
            self.rope = RopeTable(dims["head_dim"], dims["rope_theta"], dims.get("rope_scaling"))
        self.layers = LayerSessions(self.artifact, self.plan.stream, self.threads, self.compute.files,
                                    self.compute.engine, self.compute.options, self._stacked_spans())
        self._prefix_kv: list | None = None  # the last call's prefix keys/values, when asked to keep them

    def _form_and_plan(self, asked: str | None, stream_weights: bool | None,
                       chunk_tokens: int | None) -> tuple[Choice, Shape, Plan]:
        """The form the layers run in (``runtime.compute``: chosen, or the caller's) and the
        memory plan: the first of the modes (``runtime.budget``) the budget holds the model in."""
        choice = choose(self.artifact, self.threads, asked, budgeted=self.max_memory_mb is not None)
        self._tok_mb = tokenizer_mb((self.artifact.path / layout.TOKENIZER).stat().st_size, self.tokenizer.vocab_size)
        self._chunk_tokens = chunk_tokens
        self._modes = self._candidate_modes(choice, asked, stream_weights)
        budget_modes = [(self._shape(c), s) for c, s in self._modes]
        if self.max_memory_mb is None:
            fit = Fit(0, plan_load(budget_modes[0][0], None, self._modes[0][1], self._tok_mb), None)
        else:
            fit = first_fit(budget_modes, self.max_memory_mb, self._tok_mb)
        if fit is None:
            need = needed_mb(budget_modes, self._tok_mb)
            raise MemoryBudgetError(f"max_memory_mb={self.max_memory_mb:g} cannot hold this model: it needs at "
                                    f"least ~{need} MB (its layers, tokenizer, head and runtime, one chunk of work "
                                    "and the embedding cache)")
        self._mode = fit.mode
        return self._modes[fit.mode][0], budget_modes[fit.mode][0], self._finish(fit.plan, self._modes[fit.mode][0])

    def _candidate_modes(self, choice: Choice, asked: str | None, stream_weights: bool | None) -> list:
        """(form, streamed), preferred first: the chosen form resident, the artifact's smallest
        form resident, then streamed: the chosen form where it reads the smallest form's
        files (bf16: a 3B-shaped model under 1,500 MB took 0.53x int4's time, speed.md §22;
        int8's files are twice the bytes), then the smallest. A form asked for stays, and
        ``stream_weights`` True or False keeps only the modes it allows."""
        streams = [False, True] if stream_weights is None else [bool(stream_weights)]
        smallest = self.artifact.weights
        if asked is not None or choice.form == smallest:
            return [(choice, s) for s in streams]
        small = Choice(smallest, "memory budget", choice.ms, choice.cpu, smallest)
        modes = [(choice, False), (small, False)] + ([(choice, True)] if choice.files == smallest else [])
        return [(c, s) for c, s in modes + [(small, True)] if s in streams]

    def _finish(self, plan: Plan, choice: Choice) -> Plan:
        if self._chunk_tokens is not None:
            plan.chunk_tokens = int(self._chunk_tokens)
        elif choice.form == "int8":
            plan.chunk_tokens = min(plan.chunk_tokens, INT8_CHUNK_TOKENS)
        elif choice.engine == OPENVINO:
            plan.chunk_tokens = min(plan.chunk_tokens, OPENVINO_CHUNK_TOKENS)
        return plan

    def _shape(self, choice: Choice) -> Shape:
        dims, n = self.artifact.dims, self.artifact.n_layers
        return Shape(hidden=dims["hidden"], ffn=dims["ffn"], n_heads=dims["n_heads"], n_kv_heads=dims["n_kv_heads"],
                     head_dim=dims["head_dim"], n_layers=n, engine=choice.engine,
                     ffn_copies=5 if choice.form == "int8" else 3,
                     layer_bytes=[self.artifact.layer_bytes(i, choice.files) for i in range(n)],
                     head_bytes=sum(v.nbytes for v in self.head.weights.values()))

    def policy_for(self, k: int) -> PruningPolicy:
        """The pruning policy a call for the top ``k`` runs: the setting calibrated for that
        K if the manifest has one, else the artifact's main setting (options given to the
        constructor override both)."""
        return self._policy_by_k.get(int(k), self.policy)

    # ---- one call ----------------------------------------------------------------------

    def score(self, batch: EncodedBatch, top_k: int | None = None, keep_prefix_kv: bool = False) -> Scores:
        """Scores of ``batch``; ``keep_prefix_kv`` keeps the shared prefix's keys/values of
        every layer for :meth:`explain` (a few MB), until the next call."""
        t_start = time.perf_counter()
        self._prefix_kv = [] if keep_prefix_kv else None
        self.layers.reset_counters()
        rss0 = psutil.Process().memory_info().rss
        n, q = len(batch.sequences), self.head.query_rows  # rows: [query (bi-encoders)] + candidates
        k = n if top_k is None else min(int(top_k), n)
        prefix_len = batch.prefix_len if self.shared_prefix else 0
        seqs = ([batch.query] if q else []) + [s[prefix_len:] for s in batch.sequences]
        types = ([batch.query_type_ids] if q else []) + batch.type_ids if batch.type_ids is not None else None
        lengths = np.array([len(s) for s in seqs])
        chunk_tokens = self.plan_chunk(batch)
        L = self.artifact.n_layers
        count = CallCounters(L, n)
        recorder = LayerRecorder(self.record_states) if self.record_layers else None

        t0 = time.perf_counter()
        states = self._embed(seqs, types)
        prefix = batch.sequences[0][:prefix_len]
        prefix_state = self.embed.rows(np.asarray(prefix, dtype=np.int64))[None] if prefix_len else None
        count.embed_s = time.perf_counter() - t0

        run = PruningRun(self.policy_for(k), n, k, L)
        scores, provisional = np.zeros(n), np.zeros(n, dtype=bool)
        computing = np.arange(n)  # candidates that run through the next layer
        self.layers.prefetch(0)
        try:
            spans = self._spans(run, recorder is not None, self.layers.stack)
            if self.layers.stack:
                spans = self.layers.covering(spans)
            for layer, stop in spans:
                if recorder is not None:
                    recorder.before_layer(layer, self, states, np.arange(n) + q)
                if run.wants_check(layer):
                    computing = self._prune(run, layer, states, scores, provisional, count)
                    if run.done:
                        break
                rows = np.concatenate([np.arange(q), computing + q])
                prefix_state = self._run_layer(layer, stop, states, prefix_state, rows, lengths, chunk_tokens,
                                               count)
                count.layers_done[computing] += stop - layer
        finally:  # a failed call (a layer file changed, say) must not keep streamed layers
            self.layers.release()

        tier = run.tiers()
        final = np.flatnonzero((tier == 0) & ~provisional)
        if len(final):
            scores[final] = self.head.scores(states, final + q)
        stats = self._stats(batch, run, count, lengths, prefix_len, chunk_tokens, seqs, rss0)
        if recorder is not None:
            stats.update(recorder.stats(scores, lengths[q:]))
        stats["wall_s"] = time.perf_counter() - t_start
        return Scores(scores, tier, provisional, stats)

    def _spans(self, run: PruningRun, every_layer: bool, stacked: bool) -> list[tuple[int, int]]:
        """The call's layers as (first, stop) spans that run as one: one layer each, except on
        a ``stacked`` form (``compute.STACKED``), whose layers run as one from one pruning
        check to the next (the checks the call would make now: a check once off stays off)."""
        L = self.artifact.n_layers
        if not stacked:
            return [(i, i + 1) for i in range(L)]
        cuts = [0] + [i for i in range(1, L) if every_layer or run.wants_check(i)] + [L]
        return list(zip(cuts[:-1], cuts[1:]))

    def _stacked_spans(self) -> list[tuple[int, int]] | None:
        """For a stacked form held resident, the spans of a call at the artifact's main pruning
        setting, loaded with the model (a call with no checks runs them too; one that checks
        where they do not cut loads its own in their place); else None."""
        if self.compute.form not in STACKED or not self.encoder or self.plan.stream:
            return None
        return self._spans(PruningRun(self.policy, 2, 1, self.artifact.n_layers), False, True)

    def _run_layer(self, layer: int, stop: int, states: list, prefix_state: np.ndarray | None, rows: np.ndarray,
                   lengths: np.ndarray, chunk_tokens: int, count: CallCounters) -> np.ndarray | None:
        """Run ``rows`` through layers ``layer`` to ``stop - 1`` (one, unless stacked), in
        place: a decoder's shared prefix first (its keys and values feed every row), then the
        rows in length-sorted chunks; returns the prefix's new hidden state."""
        tl = time.perf_counter()
        span = stop - layer
        sess = self.layers.get(layer, stop)
        self.layers.prefetch(layer + 1)
        past, prefix_len = (None if self.encoder else self._no_past), 0
        if prefix_state is not None:
            prefix_len = prefix_state.shape[1]
            tr = time.perf_counter()
            prefix_state, past = self._run_prefix(sess, prefix_state)
            count.run_s += time.perf_counter() - tr
            count.flop += self._flop(1, prefix_len, 0)
            if self._prefix_kv is not None:
                self._prefix_kv.append(past)
            count.work += prefix_len
        for chunk in self._chunks(lengths, chunk_tokens, rows):
            w, p = self._run_chunk(sess, states, chunk, lengths, past, prefix_len, count, span)
            count.work, count.pad = count.work + span * w, count.pad + span * p
            if self.plan.stream:  # the chunk's replaced states: their pages back before the next chunk's
                return_freed_memory()
        del sess  # the window's reference is the last: done() frees the layer and returns its pages
        self.layers.done(layer, stop)
        count.layers_s += time.perf_counter() - tl
        return prefix_state

    def _embed(self, seqs: list[list[int]], types: list[list[int]] | None) -> list[np.ndarray]:
        """Each sequence's first hidden states. The table's rows are looked up for a group of
        sequences at once (one lookup per distinct token of the group, not per token of each
        sequence: minilm-l6's DL19 calls spent 26 ms here one sequence at a time), groups of at
        most EMBED_GROUP_BYTES of rows, so the rows held beside the states stay bounded."""
        per_group = max(1, EMBED_GROUP_BYTES // (4 * self.embed.hidden))
        states: list[np.ndarray] = []
        start = 0
        while start < len(seqs):
            stop, tokens = start, 0
            while stop < len(seqs) and (stop == start or tokens + len(seqs[stop]) <= per_group):
                tokens += len(seqs[stop])
                stop += 1
            group = seqs[start:stop]
            rows = self.embed.rows(np.fromiter((t for s in group for t in s), dtype=np.int64, count=tokens))
            ends = np.cumsum([len(s) for s in group])
            for i, r in zip(range(start, stop), np.split(rows, ends[:-1])):
                states.append(self.head.embed(r, types[i] if types else None))  # per sequence: in cache
            start = stop
        return states

    def _chunks(self, lengths: np.ndarray, chunk_tokens: int, rows: np.ndarray) -> list[np.ndarray]:
        """The rows' chunks for one layer: length-sorted under the token budget, or, on
        OpenVINO, grouped by the width each row runs at (:data:`OPENVINO_WIDTH_STEP`):
        OpenVINO's attention blocks its work by the padded width, and a bf16 result that
        rounds one way at one width can round the other way at another (SmolLM2 drifted
        7e-3 between chunkings), so a row always runs at a width of its own length's."""
        if self.compute.engine == OPENVINO:
            return width_chunks(lengths, chunk_tokens, OPENVINO_WIDTH_STEP, rows=rows)
        return length_chunks(lengths, chunk_tokens, rows=rows, min_fill=0.75)

    def plan_chunk(self, batch: EncodedBatch) -> int:
        """Tokens per chunk for ``batch`` under the budget. A call the current mode cannot
        hold moves the model to the first later mode that holds it (streamed weights, or the
        smallest form: the stats say so); a :class:`MemoryBudgetError` naming the smallest
        budget that runs it, before any work, where none does."""
        prefix_len = batch.prefix_len if self.shared_prefix else 0
        lengths = [len(s) - prefix_len for s in batch.sequences]
        if self.spec.kind == "bi-encoder":
            lengths.append(len(batch.query))
        call = Call(sum(lengths) + prefix_len, prefix_len, max(lengths))
        if self.max_memory_mb is None:
            return plan_call(self.shape, self.plan, None, call.tokens, call.prefix, call.longest)
        modes = [(self._shape(c), s) for c, s in self._modes]
        fit = first_fit(modes, self.max_memory_mb, self._tok_mb, call, start=self._mode)
        if fit is None:
            raise MemoryBudgetError(
                f"max_memory_mb={self.max_memory_mb:g} is too small for this call ({call.tokens} tokens, longest "
                f"sequence {call.longest}); it needs ~{needed_mb(modes, self._tok_mb, call)} MB. Rank fewer or "
                "shorter documents, or raise the budget")
        if fit.mode != self._mode:
            self._switch(fit)
        return fit.chunk

    def _switch(self, fit: Fit) -> None:
        """Run in mode ``fit.mode`` from now on (a call needed the memory it frees)."""
        self.layers.close()
        self._mode = fit.mode
        self.compute = self._modes[fit.mode][0]
        self.shape, self.plan = self._shape(self.compute), self._finish(fit.plan, self.compute)
        self.embed.max_rows = self.plan.cache_rows
        self.layers = LayerSessions(self.artifact, self.plan.stream, self.threads, self.compute.files,
                                    self.compute.engine, self.compute.options, self._stacked_spans())

    def explain(self, batch: EncodedBatch, rows: list[int], max_tokens: int):
        """Greedy rationales of candidates ``rows`` of the batch just scored (the top K),
        decoded as one batch, reusing the prefix keys/values the scoring pass kept
        (``backends/generate.py``); returns (generations, stats)."""
        from edgerank.runtime.backends.generate import explain_rows

        kept = getattr(self, "_prefix_kv", None) if self.shared_prefix else None
        try:
            return explain_rows(self, batch, rows, max_tokens, kept)
        finally:
            self.layers.release()
            self._prefix_kv = None

    # ---- pieces ------------------------------------------------------------------------

    def _prune(self, run: PruningRun, layer: int, states: list, scores: np.ndarray, provisional: np.ndarray,
               count: CallCounters) -> np.ndarray:
        """One pruning check before ``layer``: score the live candidates, let the policy
        decide, free the states of those that stop; returns the candidates still running."""
        tp = time.perf_counter()
        q = self.head.query_rows
        live = run.live
        now = self._check_scores(layer, states, live + q)
        d = run.check(layer, now)
        scores[live], provisional[live] = now, True  # provisional until the last layer
        computing = run.computing() if not run.done else np.array([], dtype=np.int64)
        stopped = live if run.done else (live[d.dropped] if run.policy.exact_order
                                         else np.setdiff1d(live, computing))
        for i in stopped:
            states[i + q] = None
        provisional[computing] = False
        count.prune_s += time.perf_counter() - tp
        return computing

    @_BLAS.wrap(limits=1, user_api="blas")
    def _check_scores(self, layer: int, states: list, rows: np.ndarray) -> np.ndarray:
        """Scores of candidate ``rows`` at a check before ``layer``: the artifact's readout
        for that layer when it has one, else the model's own head."""
        if self.readouts is None or not self.readouts.has(layer):
            return self.head.scores(states, rows)
        query = self.head.pooled(states, np.arange(1))[0] if self.head.query_rows else None
        return self.readouts.scores(layer, self.head.pooled(states, rows), query)

    def _run_prefix(self, sess, prefix_state: np.ndarray):
        P = prefix_state.shape[1]
        cos, sin = self.rope(np.arange(P)[None])
        mask = layout.decoder_mask(np.array([P]), P)
        out, key, value = sess.run(None, layout.decoder_inputs(prefix_state, cos, sin, mask, self._no_past))
        return out, (key, value)

    def _flop(self, rows: int, width: int, past: int) -> float:
        """Multiply-adds x 2 of one layer on ``rows`` x ``width`` tokens attending to ``past``
        earlier keys too: the projections and the two attention products."""
        s = self.shape
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        proj = s.hidden * (2 * q + 2 * kv) + (2 if self.encoder else 3) * s.hidden * s.ffn
        return 2.0 * rows * width * proj + 4.0 * rows * width * (width + past) * q

    def _run_chunk(self, sess, states, chunk, lengths, past, prefix_len, count: CallCounters,
                   span: int = 1) -> tuple[int, int]:
        """Run one chunk of rows through a layer (``span`` stacked layers), in place; returns
        (real, padded) tokens."""
        width = int(lengths[chunk].max())
        if self.compute.engine == OPENVINO:  # the width of its rows' own lengths (:meth:`_chunks`)
            width = padded_width(width, OPENVINO_WIDTH_STEP)
        B, H = len(chunk), self.shape.hidden
        x = np.empty((B, width, H), np.float32)  # each row's padding zeroed below, not the whole chunk first
        for r, i in enumerate(chunk):
            x[r, : lengths[i]] = states[i]
            x[r, lengths[i]:] = 0
        if self.encoder:
            feeds = layout.encoder_inputs(x, lengths[chunk])
        else:
            cos, sin = self.rope(prefix_len + np.arange(width)[None].repeat(B, 0))
            feeds = layout.decoder_inputs(x, cos, sin, layout.decoder_mask(lengths[chunk], width), past)
        tr = time.perf_counter()
        out = sess.run(None, feeds)[0]
        count.run_s += time.perf_counter() - tr
        count.flop += span * self._flop(B, width, past[0].shape[3] if past is not None else 0)
        for r, i in enumerate(chunk):
            states[i] = out[r, : lengths[i]]
        real = int(lengths[chunk].sum())
        return real, B * width - real

    def _stats(self, batch: EncodedBatch, run: PruningRun, count: CallCounters, lengths: np.ndarray,
               prefix_len: int, chunk_tokens: int, seqs: list, rss0: int) -> dict:
        """The call's statistics (``ranking.stats.extra``)."""
        L, n, policy, q = count.n_layers, count.n, run.policy, self.head.query_rows
        full_work = L * (int(lengths.sum()) + prefix_len)
        unshared = L * (sum(len(s) for s in batch.sequences) + (len(batch.query) if batch.query else 0))
        touched = len(set().union(*map(set, seqs), batch.sequences[0][:prefix_len])) / self.embed.vocab
        work, pad = count.work, count.pad
        return {
            "layers": L, "top_k": run.k, "pruning": policy.enabled, "threshold": policy.threshold,
            "min_depth": policy.min_depth, "clusters": policy.clusters, "rule": policy.rule,
            "readouts": self.readouts is not None,
            "first_check_layer": run.first if run.first <= L else None,
            "shared_prefix": self.shared_prefix if not self.encoder else "n/a (bidirectional encoder)",
            "prefix_tokens": prefix_len, "candidate_tokens": int(lengths[q:].sum()),
            "prefix_tokens_saved": (n - 1) * prefix_len if prefix_len else 0,
            "layer_token_work": int(work), "layer_token_work_unpruned": int(full_work),
            "work_skipped": 1.0 - work / full_work if full_work else 0.0,
            "work_saved_vs_unshared": 1.0 - work / unshared if unshared else 0.0,
            "padding_fraction": pad / (work + pad) if work + pad else 0.0,
            "layers_per_candidate": np.bincount(count.layers_done, minlength=L + 1).tolist(),
            "pruning_steps": run.steps, "selected": len(run.selected), "dropped": int((run.dropped_at >= 0).sum()),
            "chunk_tokens": chunk_tokens, "stream_weights": self.plan.stream, "compute": self.compute.as_dict(),
            "embed_s": count.embed_s, "layers_s": count.layers_s, "prune_s": count.prune_s,
            "ort_s": count.run_s, "between_calls_s": count.layers_s - count.run_s, "layer_gflop": count.flop / 1e9,
            "io_wait_s": self.layers.io_wait_s, "layer_load_s": self.layers.load_s,
            "embed_cache_rows": len(self.embed._cache), "vocab_touched_fraction": touched,
            "rss_start_mb": rss0 / MB,
        }

    def close(self) -> None:
        self.layers.close()
        self.embed.close()  # the table's file handle, not left to the garbage collector


# head.npz arrays each kind of model reads, and which axis is the hidden size
_HEAD = {"decoder": {"norm": 0, "rows": 1},
         "cross-encoder": {"pool_weight": 1, "pool_bias": 0, "cls_weight": 1, "cls_bias": None,
                           "position": 1, "ln_weight": 0, "ln_bias": 0},
         "bi-encoder": {"position": 1, "ln_weight": 0, "ln_bias": 0}}


def _check_options(threads: object, max_memory_mb: object, chunk_tokens: object) -> None:
    """Refuse a thread count, budget or chunk size that is not one, before anything loads."""
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads must be a positive int, or None for the physical core count (got {threads!r})")
    if max_memory_mb is not None and not (is_number(max_memory_mb) and 0 < max_memory_mb < float("inf")):
        raise ValueError(f"max_memory_mb must be a positive number of MB, or None for no budget "
                         f"(got {max_memory_mb!r})")
    if chunk_tokens is not None and (not is_int(chunk_tokens) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, or None to let the budget choose "
                         f"(got {chunk_tokens!r})")


def _embedding(artifact: Artifact, cache_rows: int) -> EmbeddingRows:
    """The artifact's embedding table (rows read on demand, an LRU of ``cache_rows``), checked
    against the manifest's hidden size."""
    scales = artifact.path / layout.EMBED_SCALE
    try:
        embed = EmbeddingRows(artifact.path / layout.EMBED, scales if scales.is_file() else None, max_rows=cache_rows)
    except ValueError as e:  # numpy: not an .npy file
        raise ModelFormatError(f"{artifact.path}: {layout.EMBED} is not a readable table ({e})") from e
    if embed._table.ndim != 2 or embed.hidden != artifact.dims["hidden"]:
        raise ModelFormatError(f"{artifact.path}: {layout.EMBED} has shape {embed._table.shape}; the "
                               f"manifest's dims.hidden is {artifact.dims['hidden']}")
    return embed


def _check_parts(path, spec, encoder: bool, head: dict, hidden: int) -> None:
    """Refuse an artifact whose head does not fit the family it is run as, or the hidden
    size its manifest states, before any work (not a KeyError mid-call)."""
    if encoder != (spec.kind != "decoder"):
        raise ModelFormatError(f"{path}: a {'BERT-style encoder' if encoder else 'decoder'} artifact cannot run "
                               f"as the {spec.family!r} family ({spec.kind})")
    for key, axis in _HEAD[spec.kind].items():
        if key not in head:
            raise ModelFormatError(f"{path}: head.npz has no {key!r}, which a {spec.kind} needs")
        if axis is not None and (head[key].ndim <= axis or head[key].shape[axis] != hidden):
            raise ModelFormatError(f"{path}: head.npz {key!r} has shape {head[key].shape}, not one of "
                                   f"hidden size {hidden}")


def _policy(given: dict, calibrated: dict, enabled: bool, exact_order: bool, where: str = "") -> PruningPolicy:
    """The policy from the call's knobs (``given``, None where not given), else the
    calibrated ones (read from ``where``), else the defaults; a bad value is a ValueError."""
    policy = PruningPolicy(enabled=enabled, exact_order=exact_order)
    rule = given.get("rule") if given.get("rule") is not None else calibrated.get("rule")
    if rule is not None:
        if rule not in RULES:
            raise ValueError(f"{where}rule must be one of {', '.join(RULES)} (got {rule!r})")
        policy.rule = rule
    keep = given.get("keep") if given.get("keep") is not None else calibrated.get("keep")
    if policy.rule == "rank":
        policy.keep = _schedule(keep, "keep", lambda f: 0 < f <= 1, "fractions in (0, 1]", where)
    margin = given.get("margin") if given.get("margin") is not None else calibrated.get("margin")
    if policy.rule == "margin":
        policy.margin = _schedule(margin, "margin", lambda m: 0 <= m < float("inf"), "finite margins >= 0", where)
    for knob in ("threshold", "min_depth", "clusters"):
        value, source = (given[knob], "") if given[knob] is not None else (calibrated.get(knob), where)
        # a bad option is the caller's ValueError; a bad manifest is a bad artifact (a ValueError too)
        error = ModelFormatError if source else ValueError
        if value is None:
            continue
        if knob == "clusters":
            if not is_int(value) or value < 2:
                raise error(f"{source}clusters must be an int >= 2 (one cluster can prune nothing; "
                                 f"got {value!r})")
            policy.clusters = int(value)
        else:
            if not (is_number(value) and 0 <= value < float("inf")):
                raise error(f"{source}{knob} must be a number >= 0 (got {value!r})")
            setattr(policy, knob, float(value))
    return policy


def _schedule(value: object, name: str, fits, what: str, where: str) -> dict[int, float]:
    """A rank or margin rule's schedule: layer index (>= 1) -> a number that ``fits``."""
    try:
        out = {int(layer): float(v) for layer, v in dict(value).items()}  # type: ignore[arg-type]
    except (TypeError, ValueError):
        out = {}
    if not out or any(layer < 1 or not fits(v) for layer, v in out.items()):
        raise ValueError(f"{where}{name} must map layer indices (>= 1) to {what} (got {value!r})")
    return out


def _per_k_policies(by_k: object, given: dict, calibrated: dict, enabled: bool, exact_order: bool,
                    where: str) -> dict[int, PruningPolicy]:
    """A policy per K of the manifest's ``pruning.by_k``. An entry's knobs stand in for the
    main calibrated ones; ``{"off": true}`` turns pruning off for that K, unless the caller
    chose knobs of their own."""
    if not isinstance(by_k, dict):
        raise ModelFormatError(f"{where}by_k must map K (a positive int) to a setting (got {by_k!r})")
    chose_knobs = any(v is not None for v in given.values())
    policies = {}
    for key, entry in by_k.items():
        k = int(key) if isinstance(key, str) and key.isdigit() else 0
        if k < 1 or not isinstance(entry, dict):
            raise ModelFormatError(f"{where}by_k must map K (a positive int) to a setting (got {by_k!r})")
        off = bool(entry.get("off")) and not chose_knobs
        policies[k] = _policy(given, {**calibrated, **entry}, enabled and not off, exact_order,
                              f"{where}by_k: {key}: ")
    return policies
