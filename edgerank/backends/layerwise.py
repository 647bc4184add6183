"""The layer-wise runtime (``backend="edgerank"``): monolithic batched forwarding of an
edgerank artifact on ONNX Runtime, with progressive cluster pruning.

One call, for decoders::

    tokens -> embedding rows (EmbeddingRows, LRU)
    for each layer (LayerSessions: resident, or streamed two at a time):
        the shared prefix (template + query) runs once; its keys/values feed every candidate
        before the layer, from min_depth on: head on each live candidate's last token ->
            PruningPolicy.decide -> selected / dropped / deferred
        live candidates run in length-sorted chunks under a token budget
    head on the last token -> scores

Encoders (BERT/XLM-R) run the same loop without a prefix (their attention is
bidirectional, so a shared prefix cannot be reused); cross-encoders score the [CLS] state
through pooler + classifier, bi-encoders by cosine of mean-pooled states with the query,
which runs alongside the candidates and is never pruned.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
from threadpoolctl import ThreadpoolController

from edgerank.artifact import Artifact
from edgerank.budget import MB, Plan, Shape, plan_call, plan_load, tokenizer_mb
from edgerank.chunking import length_chunks
from edgerank.embedding import EmbeddingRows
from edgerank.errors import ModelFormatError, is_int, is_number
from edgerank.pruning import PruningPolicy, PruningRun
from edgerank.rope import RopeTable
from edgerank.sources import ModelSource
from edgerank.streaming import LayerSessions
from edgerank.tokenization import EncodedBatch, HFTokenizer

# The head's matmuls are small numpy work between layers. Run on numpy's BLAS pool, they
# leave its worker threads spinning for a while after each call, taking the cores from the
# next layer's ONNX Runtime threads (a fifth slower per layer after a pruning check, bench/
# RESULTS.md §10.4), so they run on one BLAS thread.
_BLAS = ThreadpoolController()

NEG = np.float32(-1e9)  # additive mask value: exp() of it is exactly 0 next to real scores


@dataclass
class Scores:
    """A backend's answer: scores in input order, plus how far each candidate got.

    ``tier`` orders candidates before ``values`` do: 0 for the top-K (and for everything
    when nothing was pruned); dropped candidates get 1 + the number of layers they missed,
    so one dropped later ranks above one dropped earlier. ``provisional`` marks scores
    taken from an intermediate layer."""

    values: np.ndarray
    tier: np.ndarray
    provisional: np.ndarray
    stats: dict = field(default_factory=dict)


class LayerwiseBackend:
    name = "edgerank"
    prunes = True  # score(batch, top_k) returns Scores with tiers

    def __init__(self, source: ModelSource, threads: int | None = None, stream_weights: bool | None = None,
                 max_memory_mb: float | None = None, pruning: bool = True, threshold: float | None = None,
                 min_depth: float | None = None, clusters: int | None = None, exact_order: bool = True,
                 shared_prefix: bool = True,
                 chunk_tokens: int | None = None, verify: bool = True, record_layers: bool = False) -> None:
        self.artifact = Artifact.open(source.path, verify=verify)
        self.spec = source.spec
        self.tokenizer = HFTokenizer.from_file(self.artifact.path / "tokenizer.json")
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ValueError(f"threads must be a positive int, or None for the physical core count (got {threads!r})")
        self.threads = int(threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        if max_memory_mb is not None and not (is_number(max_memory_mb) and 0 < max_memory_mb < float("inf")):
            raise ValueError(f"max_memory_mb must be a positive number of MB, or None for no budget "
                             f"(got {max_memory_mb!r})")
        if chunk_tokens is not None and (not is_int(chunk_tokens) or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int, or None to let the budget choose "
                             f"(got {chunk_tokens!r})")
        dims = self.artifact.dims
        self.head = self.artifact.head()
        self.encoder = self.artifact.is_encoder
        _check_parts(self.artifact.path, self.spec, self.encoder, self.head, dims["hidden"])
        self.shape = Shape(hidden=dims["hidden"], ffn=dims["ffn"], n_heads=dims["n_heads"],
                           n_kv_heads=dims["n_kv_heads"], head_dim=dims["head_dim"], n_layers=self.artifact.n_layers,
                           layer_bytes=[self.artifact.layer_bytes(i) for i in range(self.artifact.n_layers)],
                           head_bytes=sum(v.nbytes for v in self.head.values()))
        # "No earlier tokens": the past K/V fed to the prefix pass, and to every chunk when no
        # shared prefix applies (decoders only).
        self._no_past = (np.zeros((1, self.shape.n_kv_heads, 1, 0, self.shape.head_dim), np.float32),) * 2
        self.max_memory_mb = max_memory_mb
        self.record_layers = record_layers  # keep every layer's head scores (calibration)
        self.plan: Plan = plan_load(self.shape, max_memory_mb, stream_weights, tokenizer_mb(
            (self.artifact.path / "tokenizer.json").stat().st_size, self.tokenizer.vocab_size))
        if chunk_tokens is not None:
            self.plan.chunk_tokens = int(chunk_tokens)
        if record_layers and pruning:
            raise ValueError("record_layers=True needs pruning=False (every candidate through every layer)")
        # knobs: the call's options, else the artifact's calibrated values for the call's K
        # (``pruning.by_k``), else its main calibrated values, else the defaults
        calibrated = self.artifact.manifest.get("pruning") or {}
        given = {"threshold": threshold, "min_depth": min_depth, "clusters": clusters}
        where = f"{self.artifact.path / 'manifest.json'}: pruning: "
        self.policy = _policy(given, calibrated, bool(pruning), exact_order, where)
        self._policy_by_k = _per_k_policies(calibrated.get("by_k") or {}, given, calibrated, bool(pruning),
                                            exact_order, where)
        self.shared_prefix = bool(shared_prefix) and not self.encoder
        scales = self.artifact.path / "embed_scale.npy"
        try:
            self.embed = EmbeddingRows(self.artifact.path / "embed.npy", scales if scales.is_file() else None,
                                       max_rows=self.plan.cache_rows)
        except ValueError as e:  # numpy: not an .npy file
            raise ModelFormatError(f"{self.artifact.path}: embed.npy is not a readable table ({e})") from e
        if self.embed._table.ndim != 2 or self.embed.hidden != dims["hidden"]:
            raise ModelFormatError(f"{self.artifact.path}: embed.npy has shape {self.embed._table.shape}; the "
                                   f"manifest's dims.hidden is {dims['hidden']}")
        if not self.encoder:
            self.rope = RopeTable(dims["head_dim"], dims["rope_theta"], dims.get("rope_scaling"))
        self.layers = LayerSessions(self.artifact, self.plan.stream, self.threads)

    def policy_for(self, k: int) -> PruningPolicy:
        """The pruning policy a call for the top ``k`` runs: the setting calibrated for that
        K if the manifest has one, else the artifact's main setting (options given to the
        constructor override both)."""
        return self._policy_by_k.get(int(k), self.policy)

    # ---- head: intermediate and final scores -------------------------------------------

    @_BLAS.wrap(limits=1, user_api="blas")
    def _head_scores(self, states: np.ndarray, query_state: np.ndarray | None = None) -> np.ndarray:
        """Scores from per-candidate states: the last token (decoders), [CLS] (cross-encoders)
        or the mean-pooled state (bi-encoders, against ``query_state``)."""
        h = self.head
        if not self.encoder:
            x = states.astype(np.float32)
            var = np.mean(x * x, axis=-1, keepdims=True)
            x = x / np.sqrt(var + np.float32(self.artifact.dims["norm_eps"])) * h["norm"]
            return self.spec.score.apply(x @ h["rows"].T)
        if self.spec.kind == "cross-encoder":
            pooled = np.tanh(states @ h["pool_weight"].T + h["pool_bias"])
            return self.spec.score.apply(pooled @ h["cls_weight"].T + h["cls_bias"])
        docs = states / np.maximum(np.linalg.norm(states, axis=-1, keepdims=True), 1e-12)
        q = query_state / max(float(np.linalg.norm(query_state)), 1e-12)
        return docs.astype(np.float64) @ q.astype(np.float64)

    # ---- one call ----------------------------------------------------------------------

    def score(self, batch: EncodedBatch, top_k: int | None = None) -> Scores:
        t_start = time.perf_counter()
        self.layers.reset_counters()
        rss0 = psutil.Process().memory_info().rss
        n = len(batch.sequences)
        k = n if top_k is None else min(int(top_k), n)
        prefix_len = batch.prefix_len if self.shared_prefix else 0
        prefix = batch.sequences[0][:prefix_len]
        seqs = [s[prefix_len:] for s in batch.sequences]
        types = batch.type_ids
        if self.spec.kind == "bi-encoder":  # the query rides along as the last sequence
            seqs = seqs + [batch.query]
            types = types + [batch.query_type_ids]
        lengths = np.array([len(s) for s in seqs])
        plan_chunk = self.plan_chunk(batch)

        t0 = time.perf_counter()
        states = [self._embed(s, types[i] if types else None) for i, s in enumerate(seqs)]
        prefix_state = self._embed(prefix, None)[None] if prefix_len else None
        embed_s = time.perf_counter() - t0
        touched = len(set().union(*map(set, seqs), prefix)) / self.embed.vocab

        L = self.artifact.n_layers
        policy = self.policy_for(k)
        run = PruningRun(policy, n, k, L)
        computing = np.arange(len(seqs))  # rows run through the next layer (bi-encoder query last)
        scores = np.zeros(n)
        provisional = np.zeros(n, dtype=bool)
        layers_done = np.zeros(n, dtype=np.int64)
        record = [] if self.record_layers else None
        work = pad = 0
        t_layers = t_prune = 0.0
        self.layers.prefetch(0)
        for layer in range(L):
            if record is not None and layer > 0:
                record.append(self._head_scores(*self._pool(states, np.arange(n), seqs)))
            if run.wants_check(layer):
                tp = time.perf_counter()
                now = self._head_scores(*self._pool(states, run.live, seqs))
                live = run.live
                d = run.check(layer, now)
                scores[live], provisional[live] = now, True  # provisional until the last layer
                stopped = live[d.dropped] if policy.exact_order else np.setdiff1d(live, run.computing())
                if run.done:
                    stopped = live
                for i in stopped:
                    states[i] = None
                computing = run.computing() if not run.done else np.array([], dtype=np.int64)
                if self.spec.kind == "bi-encoder":
                    computing = np.append(computing, n)
                provisional[computing[computing < n]] = False
                t_prune += time.perf_counter() - tp
                if run.done:
                    break
            tl = time.perf_counter()
            sess = self.layers.get(layer)
            self.layers.prefetch(layer + 1)
            past = None if self.encoder else self._no_past
            if prefix_state is not None:
                prefix_state, past = self._run_prefix(sess, prefix_state)
                work += prefix_len
            for chunk in length_chunks(lengths, plan_chunk, rows=computing, min_fill=0.75):
                w, p = self._run_chunk(sess, states, seqs, chunk, lengths, past, prefix_len)
                work += w
                pad += p
            layers_done[computing[computing < n]] += 1
            self.layers.done(layer)
            del sess
            t_layers += time.perf_counter() - tl
        self.layers.release()
        tier = run.tiers()

        final = np.flatnonzero((tier == 0) & ~provisional)
        if len(final):
            scores[final] = self._head_scores(*self._pool(states, final, seqs))
        full_work = L * (int(lengths[:n].sum()) + prefix_len + (int(lengths[n]) if self.spec.kind == "bi-encoder" else 0))
        unshared = L * (sum(len(s) for s in batch.sequences) + (len(batch.query) if batch.query else 0))
        stats = {
            "layers": L, "top_k": k, "pruning": policy.enabled, "threshold": policy.threshold,
            "min_depth": policy.min_depth, "clusters": policy.clusters,
            "first_check_layer": run.first if run.first <= L else None,
            "shared_prefix": self.shared_prefix if not self.encoder else "n/a (bidirectional encoder)",
            "prefix_tokens": prefix_len, "candidate_tokens": int(lengths[:n].sum()),
            "prefix_tokens_saved": (n - 1) * prefix_len if prefix_len else 0,
            "layer_token_work": int(work), "layer_token_work_unpruned": int(full_work),
            "work_skipped": 1.0 - work / full_work if full_work else 0.0,
            "work_saved_vs_unshared": 1.0 - work / unshared if unshared else 0.0,
            "padding_fraction": pad / (work + pad) if work + pad else 0.0,
            "layers_per_candidate": np.bincount(layers_done, minlength=L + 1).tolist(),
            "pruning_steps": run.steps, "selected": len(run.selected), "dropped": int((run.dropped_at >= 0).sum()),
            "chunk_tokens": plan_chunk, "stream_weights": self.plan.stream,
            "embed_s": embed_s, "layers_s": t_layers, "prune_s": t_prune,
            "io_wait_s": self.layers.io_wait_s, "layer_load_s": self.layers.load_s,
            "embed_cache_rows": len(self.embed._cache), "vocab_touched_fraction": touched,
            "rss_start_mb": rss0 / MB,
            "wall_s": time.perf_counter() - t_start,
        }
        if record is not None:
            record.append(scores.copy())
            stats["layer_scores"] = np.stack(record)  # [L, n]: before layers 1..L-1, then final
            stats["candidate_lengths"] = lengths[:n]
        return Scores(scores, tier, provisional, stats)

    def plan_chunk(self, batch: EncodedBatch) -> int:
        """Tokens per chunk for ``batch`` under the budget; a :class:`MemoryBudgetError`
        before any work if the call cannot fit."""
        prefix_len = batch.prefix_len if self.shared_prefix else 0
        lengths = [len(s) - prefix_len for s in batch.sequences]
        if self.spec.kind == "bi-encoder":
            lengths.append(len(batch.query))
        return plan_call(self.shape, self.plan, self.max_memory_mb, sum(lengths) + prefix_len, prefix_len,
                         max(lengths))

    # ---- pieces ------------------------------------------------------------------------

    def _embed(self, ids: list[int], type_ids: list[int] | None) -> np.ndarray:
        x = self.embed.rows(np.asarray(ids, dtype=np.int64))
        if not self.encoder:
            return x
        h, off = self.head, self.artifact.dims.get("position_offset", 0)
        x = x + h["position"][off: off + len(ids)]
        if "token_type" in h:
            x = x + h["token_type"][np.asarray(type_ids if type_ids is not None else [0] * len(ids))]
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        eps = np.float32(self.artifact.dims["norm_eps"])
        return ((x - mu) / np.sqrt(var + eps) * h["ln_weight"] + h["ln_bias"]).astype(np.float32)

    def _pool(self, states, rows, seqs) -> tuple:
        """Per-row states the head reads, and (bi-encoders) the query's pooled state."""
        if not self.encoder:
            return (np.stack([states[i][-1] for i in rows]),)
        if self.spec.kind == "cross-encoder":
            return (np.stack([states[i][0] for i in rows]),)
        q = states[len(seqs) - 1].mean(0)
        return np.stack([states[i].mean(0) for i in rows]), q

    def _run_prefix(self, sess, prefix_state: np.ndarray):
        P = prefix_state.shape[1]
        cos, sin = self.rope(np.arange(P)[None])
        mask = np.triu(np.full((P, P), NEG, np.float32), 1)[None, None, None]
        out, key, value = sess.run(None, {"hidden": prefix_state, "cos": cos, "sin": sin, "mask": mask,
                                          "past_key": self._no_past[0], "past_value": self._no_past[1]})
        return out, (key, value)

    def _run_chunk(self, sess, states, seqs, chunk, lengths, past, prefix_len) -> tuple[int, int]:
        """Run one chunk of rows through a layer, in place; returns (real, padded) tokens."""
        width = int(lengths[chunk].max())
        B, H = len(chunk), self.shape.hidden
        x = np.zeros((B, width, H), np.float32)
        for r, i in enumerate(chunk):
            x[r, : lengths[i]] = states[i]
        valid = np.arange(width)[None, :] < lengths[chunk][:, None]  # [B,T] real keys
        if self.encoder:
            mask = np.where(valid, 0.0, NEG).astype(np.float32)[:, None, None, :]
            (out,) = sess.run(None, {"hidden": x, "mask": mask})
        else:
            causal = np.tril(np.ones((width, width), bool))
            mask = np.where(causal[None] & valid[:, None, :], 0.0, NEG).astype(np.float32)[:, None, None]
            pos = prefix_len + np.arange(width)[None].repeat(B, 0)
            cos, sin = self.rope(pos)
            out, _, _ = sess.run(None, {"hidden": x, "cos": cos, "sin": sin, "mask": mask,
                                        "past_key": past[0], "past_value": past[1]})
        for r, i in enumerate(chunk):
            states[i] = out[r, : lengths[i]]
        real = int(lengths[chunk].sum())
        return real, B * width - real

    def close(self) -> None:
        self.layers.close()


# head.npz arrays each kind of model reads, and which axis is the hidden size
_HEAD = {"decoder": {"norm": 0, "rows": 1},
         "cross-encoder": {"pool_weight": 1, "pool_bias": 0, "cls_weight": 1, "cls_bias": None,
                           "position": 1, "ln_weight": 0, "ln_bias": 0},
         "bi-encoder": {"position": 1, "ln_weight": 0, "ln_bias": 0}}


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
