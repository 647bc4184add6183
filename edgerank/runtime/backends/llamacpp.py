"""llama.cpp whole-model backend: a GGUF decoder through llama-cpp-python's C API.

Candidates go into one ``llama_decode`` as separate sequences, one sequence id each, as
long as they fit the token budget; only each sequence's last token asks for logits, and
only the answer-label entries of those are read.

Each sequence gets its own KV stream (``kv_unified=False``). With one unified cache,
llama.cpp's CPU attention gave identical documents different scores depending on their
slot in the batch (0.827 to 0.842 for one SmolLM2 pair); separate streams give equal
scores, and attention costs the sum of each sequence's squared length, not the square
of their total. Flash attention is off by default: on the CPU it accumulates in fp16
and made a candidate's score depend on what else shared its decode (0.826 vs 0.833);
without it, batched and one-at-a-time scores are identical.

On a CPU with AMX (Intel Sapphire Rapids and later), llama.cpp repacks quantized weights
into its AMX buffer type, and its AMX matmul crashed the process (SIGSEGV) on the first
decode for every quantized type tried here (Q4_0, Q4_1, Q8_0, Q4_K), although the CPU's
AMX instructions themselves work (upstream: ggml-org/llama.cpp#20824). So by default the
backend turns llama.cpp's extra buffer types off where its build reports ``AMX_INT8 = 1``,
and leaves them on (weight repacking for AVX2/AVX-512) everywhere else; ``extra_buffers=``
overrides the choice.
"""

from __future__ import annotations

import ctypes

import numpy as np
import psutil

from edgerank.errors import BackendUnavailableError, ModelFormatError
from edgerank.runtime.backends.contract import Scores
from edgerank.runtime.sources import ModelSource
from edgerank.runtime.tokenization import (
    EncodedBatch,
    LlamaCppTokenizer,
    label_token_ids,
)

_SILENT = None  # keeps the no-op log callback alive for the life of the process


def _silence_llama_logs(llama_cpp) -> None:
    global _SILENT
    if _SILENT is None:
        _SILENT = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))


def extra_buffers_are_safe(system_info: str) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types, given its
    ``llama_print_system_info()``: not where it would pick its AMX kernels (module doc)."""
    return "AMX_INT8 = 1" not in system_info


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, source: ModelSource, n_threads: int | None = None,
                 batch_tokens: int = 2048, max_sequences: int = 16, flash_attn: bool = False,
                 extra_buffers: bool | None = None) -> None:
        if source.kind != "gguf":
            raise BackendUnavailableError(
                f"backend 'llamacpp' runs GGUF files; {source.path} is a {source.kind} model "
                "(convert it: python -m edgerank.converters SRC --to gguf)"
            )
        if source.spec.kind == "cross-encoder":
            raise BackendUnavailableError(
                "backend 'llamacpp' cannot score cross-encoders: llama.cpp has no BERT pooler+classifier head")
        self.embedding = source.spec.kind == "bi-encoder"
        import llama_cpp

        self._lib = llama_cpp
        self.source = source
        self.spec = source.spec
        self.batch_tokens = max(int(batch_tokens), self.spec.max_length)
        self.max_sequences = min(int(max_sequences), llama_cpp.llama_max_parallel_sequences())
        threads = n_threads or psutil.cpu_count(logical=False) or 1
        _silence_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if extra_buffers is None:
            extra_buffers = extra_buffers_are_safe(llama_cpp.llama_print_system_info().decode(errors="replace"))
        self.extra_buffers = mparams.use_extra_bufts = bool(extra_buffers)
        self._model = llama_cpp.llama_model_load_from_file(str(source.path).encode(), mparams)
        if not self._model:
            raise ModelFormatError(f"llama.cpp could not load {source.path}")
        cparams = self._context_params(threads, flash_attn)
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelFormatError(f"llama.cpp could not create a context for {source.path}")
        self._adapter = self._apply_adapter(source) if source.adapter is not None else None
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.tokenizer = LlamaCppTokenizer(vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.label_ids = [] if self.embedding else label_token_ids(self.tokenizer, self.spec.score.labels)
        self._batch = llama_cpp.llama_batch_init(self.batch_tokens, 0, 1)

    def _context_params(self, threads: int, flash_attn: bool):
        """llama.cpp context settings: one stream per sequence, a whole sequence per stream."""
        llama_cpp = self._lib
        cparams = llama_cpp.llama_context_default_params()
        # every stream holds one whole sequence: n_ctx is split evenly across streams
        cparams.n_ctx = self.max_sequences * self.spec.max_length
        cparams.n_batch = self.batch_tokens
        # an encoder (BERT) must see each decode in one micro-batch, or llama.cpp aborts
        cparams.n_ubatch = self.batch_tokens if self.embedding else min(512, self.batch_tokens)
        cparams.n_seq_max = self.max_sequences
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = self.embedding
        if self.embedding:
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        cparams.flash_attn_type = 1 if flash_attn else 0
        return cparams

    def _apply_adapter(self, source: ModelSource):
        """Load the fine-tuned LoRA update kept beside quantized base weights, and apply it."""
        llama_cpp = self._lib
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(source.adapter).encode())
        if not adapter:
            self.close()
            raise ModelFormatError(f"llama.cpp could not load the LoRA adapter {source.adapter} for {source.path}")
        one = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        if llama_cpp.llama_set_adapters_lora(self._ctx, one, 1, (ctypes.c_float * 1)(1.0)) != 0:
            self._adapter = adapter
            self.close()
            raise ModelFormatError(f"llama.cpp could not apply the LoRA adapter {source.adapter}")
        return adapter

    def score(self, batch: EncodedBatch, top_k: int | None = None) -> Scores:
        """One score per sequence, decoding many sequences per ``llama_decode`` call
        (every candidate runs to the last layer, whatever ``top_k``)."""
        seqs = [batch.query] + batch.sequences if self.embedding else batch.sequences
        width = self.n_embd if self.embedding else len(self.label_ids)
        out = np.zeros((len(seqs), width), dtype=np.float64)
        for group in self._groups(seqs):
            out[group] = self._decode([seqs[i] for i in group])
        if self.embedding:  # mean-pooled embeddings; the query is row 0, as on every backend
            return Scores.final(self.spec.score.apply(out[1:], query=out[0]))
        return Scores.final(self.spec.score.apply(out))

    def _groups(self, seqs: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        groups, cur, used = [], [], 0
        for i in order:
            n = len(seqs[i])
            if cur and (used + n > self.batch_tokens or len(cur) == self.max_sequences):
                groups.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            groups.append(cur)
        return groups

    def _decode(self, seqs: list[list[int]]) -> np.ndarray:
        lib, b = self._lib, self._batch
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        k, last = 0, []
        for sid, s in enumerate(seqs):
            for pos, tok in enumerate(s):
                b.token[k] = tok
                b.pos[k] = pos
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = sid
                b.logits[k] = self.embedding or pos == len(s) - 1  # pooling reads every token
                k += 1
            last.append(k - 1)
        b.n_tokens = k
        rc = lib.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on {len(seqs)} sequences, {k} tokens")
        if self.embedding:
            return np.array([lib.llama_get_embeddings_seq(self._ctx, sid)[: self.n_embd]
                             for sid in range(len(seqs))], dtype=np.float64)
        out = np.empty((len(seqs), len(self.label_ids)), dtype=np.float64)
        for r, idx in enumerate(last):
            row = lib.llama_get_logits_ith(self._ctx, idx)
            out[r] = [row[t] for t in self.label_ids]
        return out

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_adapter", None):
            lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
