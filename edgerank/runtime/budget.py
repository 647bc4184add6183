"""Memory budget: from ``max_memory_mb`` to streaming mode, chunk size and embedding cache.

The budget counts memory the model adds to the process (weights, embedding cache, hidden
states, activations), not the Python interpreter and libraries already loaded. The plan
is checked before any work starts: a budget that cannot be met is a
:class:`MemoryBudgetError` with the smallest budget that would work.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from edgerank.errors import EdgerankError

MB = 2**20
# ONNX Runtime holds a session's weights plus its own bookkeeping: measured 1.21x the file
# size (smollm2-135m) to 1.32x (minilm-l6); 9859d57 assumed 1.3.
SESSION_OVERHEAD = 1.4
# The first session of a process also sets up ONNX Runtime itself (environment, kernel
# registry, thread pool): measured 10.3 MB on minilm-l6 (a 1.3 MB layer file took 11.6 MB),
# and it is not returned when the sessions go (bench/RESULTS.md §12).
RUNTIME_MB = 11.0
# Rows of the memory-mapped embedding table read between two releases of its pages
# (edgerank.runtime.embedding): the table's pages held at once are bounded by this.
EMBED_READ_ROWS = 256
# The kernel's page: 4 KiB on x86 and most ARM Linux, 16 KiB on Apple Silicon (Asahi), 64 KiB
# on some ARM server kernels; the table's pages held scale with it
PAGE_BYTES = mmap.PAGESIZE
# A loaded tokenizer's RSS, bounded two ways, each covering both tokenizers measured
# (minilm-l6: 0.47 MB file, 30,522 tokens -> 9.2 MB; smollm2-135m: 3.4 MB, 49,152 -> 29.4 MB).
TOKENIZER_PER_FILE_BYTE = 22
TOKENIZER_PER_TOKEN = 650


def tokenizer_mb(file_bytes: int, vocab_size: int) -> float:
    """What loading a tokenizer.json of ``file_bytes`` with ``vocab_size`` tokens adds, in MB."""
    return min(TOKENIZER_PER_FILE_BYTE * file_bytes, TOKENIZER_PER_TOKEN * vocab_size) / MB
DEFAULT_CHUNK_TOKENS = 1024  # activations ~0.25 MB/token for a 0.5B model; larger chunks were not faster (bench/RESULTS.md §6.1)
# The int8 form's chunks: 27 MB less peak RSS on minilm-l6 than 1,024 tokens, for ~6% more
# latency (RESULTS §18.2); the int8 weights hold more memory, the chunks give it back
INT8_CHUNK_TOKENS = 512
MIN_CACHE_ROWS = 1024
DEFAULT_CACHE_ROWS = 16384
LEAST_TOKENS = 128  # a budget must fit at least one sequence this long


class MemoryBudgetError(EdgerankError, MemoryError):
    """``max_memory_mb`` is too small for this model or this call."""


@dataclass
class Plan:
    stream: bool
    cache_rows: int
    chunk_tokens: int
    weights_mb: float  # resident layer weights, estimated
    fixed_mb: float = 0.0  # what the model holds whatever the call: tokenizer, head, runtime, table pages


@dataclass(frozen=True)
class Shape:
    """What the budget needs to know about a model."""

    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    layer_bytes: list[int]
    head_bytes: int

    def activation_bytes_per_token(self, context: int) -> int:
        """Peak live activations of one token inside a layer (fp32), attending to ``context`` keys.
        A quarter above the tensors counted: ONNX Runtime's measured peak was ~7% above them
        on minilm-l6 (bench/RESULTS.md §12)."""
        return int(1.25 * 4 * (3 * self.ffn + 8 * self.hidden + 2 * self.n_heads * context))

    def hidden_bytes(self, tokens: int) -> int:
        """Hidden states kept between layers (two copies: in and out)."""
        return 2 * 4 * self.hidden * tokens

    def kv_bytes(self, prefix: int) -> int:
        return 4 * 2 * self.n_layers * self.n_kv_heads * self.head_dim * prefix


def plan_load(shape: Shape, max_memory_mb: float | None, stream: bool | None, tokenizer_mb: float = 0.0) -> Plan:
    """Streaming mode and cache size for a budget (``None``: unbounded, all resident);
    ``tokenizer_mb`` is the loaded tokenizer's share (:func:`tokenizer_mb`)."""
    resident = SESSION_OVERHEAD * sum(shape.layer_bytes) / MB
    window = SESSION_OVERHEAD * 2 * max(shape.layer_bytes) / MB
    row_mb = 4 * shape.hidden / MB
    # the head is read from an npz (a copy while it is converted), the table's pages while
    # rows are read (a row may straddle two pages)
    # and one weight matrix dequantized to fp32 by a MatMulNBits kernel
    fixed = (2 * shape.head_bytes / MB + RUNTIME_MB + tokenizer_mb
             + EMBED_READ_ROWS * 2 * PAGE_BYTES / MB + 4 * shape.hidden * shape.ffn / MB)
    if max_memory_mb is None:
        s = bool(stream)
        return Plan(s, DEFAULT_CACHE_ROWS, DEFAULT_CHUNK_TOKENS, window if s else resident, fixed)
    # the least any call needs: one short sequence's activations and hidden states
    least_call = (shape.activation_bytes_per_token(LEAST_TOKENS) * LEAST_TOKENS + shape.hidden_bytes(LEAST_TOKENS)) / MB
    s = stream if stream is not None else (resident + fixed + least_call + MIN_CACHE_ROWS * row_mb > max_memory_mb)
    weights = window if s else resident
    spare = max_memory_mb - weights - fixed - least_call
    if spare < MIN_CACHE_ROWS * row_mb:
        need = weights + fixed + least_call + MIN_CACHE_ROWS * row_mb
        raise MemoryBudgetError(
            f"max_memory_mb={max_memory_mb:g} cannot hold this model: it needs at least ~{need:.0f} MB "
            f"({'two streamed layers' if s else 'all layers resident'} {weights:.0f} MB, tokenizer, head and "
            f"runtime {fixed:.0f} MB, one chunk of work {least_call:.0f} MB, embedding cache)")
    cache_rows = int(min(DEFAULT_CACHE_ROWS, max(MIN_CACHE_ROWS, 0.25 * spare / row_mb)))
    return Plan(s, cache_rows, DEFAULT_CHUNK_TOKENS, weights, fixed)


def plan_call(shape: Shape, plan: Plan, max_memory_mb: float | None, tokens: int, prefix: int,
              longest: int) -> int:
    """Tokens per chunk for one call; a clear error before work if the call cannot fit.

    The embedding cache is counted at its capacity (``plan.cache_rows``), not at what it
    holds now: an empty cache fills during the call (9859d57 counted it empty, and a first
    call overran its budget by the cache)."""
    per_token = shape.activation_bytes_per_token(prefix + longest)
    if max_memory_mb is None:
        return max(plan.chunk_tokens, longest)
    cache_mb = plan.cache_rows * 4 * shape.hidden / MB
    spare = (max_memory_mb - plan.weights_mb - plan.fixed_mb - cache_mb) * MB
    spare -= shape.hidden_bytes(tokens) + shape.kv_bytes(prefix)
    chunk = int(spare // per_token) if spare > 0 else 0
    if chunk < longest:
        need = max_memory_mb + (longest * per_token - spare) / MB
        raise MemoryBudgetError(
            f"max_memory_mb={max_memory_mb:g} is too small for this call ({tokens} tokens, longest sequence "
            f"{longest}); it needs ~{need:.0f} MB. Rank fewer or shorter documents, or raise the budget")
    return min(chunk, max(plan.chunk_tokens, longest))


def decode_rows(shape: Shape, plan: Plan, max_memory_mb: float | None, own: int, context: int, most: int) -> int:
    """How many candidates ``explain`` decodes together: ``most`` without a budget. Under
    one, as many as its room for a call holds (the scoring pass's hidden states are gone
    by then), each row holding its keys/values for ``context`` positions in every layer
    (one layer's twice while its past is assembled) and, in the first pass, the
    activations of its ``own`` tokens; at least one (the scoring pass fitted one)."""
    if max_memory_mb is None:
        return most
    cache_mb = plan.cache_rows * 4 * shape.hidden / MB
    room = (max_memory_mb - plan.weights_mb - plan.fixed_mb - cache_mb) * MB
    per_row = shape.kv_bytes(context) * (1 + 1 / shape.n_layers) + shape.activation_bytes_per_token(context) * own
    return int(max(1, min(most, room // per_row)))
