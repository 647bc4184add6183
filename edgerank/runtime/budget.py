"""Memory budget: from ``max_memory_mb`` to form, streaming mode, chunk size and embedding cache.

The budget counts memory the model adds to the process (weights, embedding cache, hidden
states, activations), not the Python interpreter and libraries already loaded. The plan
is checked before any work starts: a budget that cannot be met is a
:class:`MemoryBudgetError` naming the smallest budget that works (:func:`needed_mb`).

A model can run in several *modes*, from the most memory to the least: its fastest form
resident, its smallest form resident, its smallest form streamed two layers at a time. A
budget takes the first mode that holds the model; a call too large for that mode moves the
model to the first later mode that holds the call (:func:`first_fit`). So whatever runs
under a budget also runs under every larger one (issue 42: a larger budget chose resident
weights and then refused a call that streaming ran under a smaller one).
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass

from edgerank.errors import EdgerankError
from edgerank.runtime.chunking import padded_width
from edgerank.runtime.engines import OPENVINO, OPENVINO_WIDTH_STEP

MB = 2**20


@dataclass(frozen=True)
class EngineMemory:
    """What an engine holds for a layer file of B bytes (``per_file_byte`` x B) plus each
    layer's own bookkeeping (``per_layer_mb``), and for itself once per process, whatever is
    loaded (``runtime_mb``)."""

    per_file_byte: float
    runtime_mb: float
    per_layer_mb: float


ENGINE_MEMORY = {
    # ONNX Runtime holds a session's weights plus its own bookkeeping: measured 1.21x the file
    # size (smollm2-135m) to 1.32x (minilm-l6); 9859d57 assumed 1.3. Its first session sets up
    # the environment, kernel registry and thread pool: 10.3 MB on minilm-l6, not returned when
    # the sessions go (bench/history/applications.md §12).
    # Each session also keeps its graph, kernels and scratch: ~0.5 MB beyond its weights (a
    # streamed minilm-l6 ran 1.4 MB over a budget that counted none, three sessions in flight).
    "onnxruntime": EngineMemory(1.4, 11.0, 0.5),
    # OpenVINO's CPU plugin keeps a compiled layer's weights repacked for its kernels: 2.8x
    # the int4 file on minilm-l6; the plugin itself ~60 MB (bench/history/speed.md §19)
    "openvino": EngineMemory(3.0, 64.0, 2.0),
}
# Rows of the memory-mapped embedding table read between two releases of its pages
# (edgerank.runtime.embedding): the table's pages held at once are bounded by this.
EMBED_READ_ROWS = 256
# A call's sequences have their table rows looked up in groups of at most this many bytes of
# fp32 rows (LayerwiseBackend._embed): the group's rows live beside the states being built
EMBED_GROUP_BYTES = 1 << 20  # as fast as 4 MB on minilm-l6 (16 against 17 ms a call)
# The kernel's page: 4 KiB on x86 and most ARM Linux, 16 KiB on Apple Silicon (Asahi), 64 KiB
# on some ARM server kernels; the table's pages held scale with it
PAGE_BYTES = mmap.PAGESIZE
# A loaded tokenizer's RSS, bounded two ways, each covering both tokenizers measured
# (minilm-l6: 0.47 MB file, 30,522 tokens -> 9.2 MB; smollm2-135m: 3.4 MB, 49,152 -> 29.4 MB).
TOKENIZER_PER_FILE_BYTE = 22
TOKENIZER_PER_TOKEN = 650
# A call's own numpy and Python temporaries and the allocator's slack beyond the tensors
# counted: a small random decoder ran 0.7 MB over a budget that counted everything else,
# and from run to run its peak moves by a few tenths of a MB.
CALL_SLACK_MB = 2.0


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``); True if any.

    glibc keeps freed memory for reuse, and after a large block is freed it raises the size
    above which blocks are mapped (and unmapped when freed): the replaced hidden states of
    each chunk, and a dropped streamed layer, stayed in the process while the next ones were
    allocated. Under a budget of 43 MB, minilm-l6 added 38 to 52 MB from run to run; trimmed
    after each chunk and each dropped layer when streaming, 35 to 37 MB, for ~1.3x the
    streamed call's time (8 runs each, bench/history/memory.md §14). Fixing glibc's
    thresholds instead made every call, streamed or not, 2.6x slower. Other C libraries:
    no-op.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def tokenizer_mb(file_bytes: int, vocab_size: int) -> float:
    """What loading a tokenizer.json of ``file_bytes`` with ``vocab_size`` tokens adds, in MB."""
    return min(TOKENIZER_PER_FILE_BYTE * file_bytes, TOKENIZER_PER_TOKEN * vocab_size) / MB
DEFAULT_CHUNK_TOKENS = 1024  # activations ~0.25 MB/token for a 0.5B model; larger chunks were not faster (bench/RESULTS.md §6.1)
# The int8 form's chunks: 27 MB less peak RSS on minilm-l6 than 1,024 tokens, for ~6% more
# latency (RESULTS §18.2); the int8 weights hold more memory, the chunks give it back
INT8_CHUNK_TOKENS = 512
# OpenVINO's chunks: each compiled layer keeps scratch sized by the largest chunk it ran
# (~13 MB a SmolLM2 layer at 1,024 tokens); at 512 a DL19 run peaked at 782 MB, not 958
OPENVINO_CHUNK_TOKENS = 512
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
    engine: str = "onnxruntime"  # what runs the layers (runtime.engines): how much it holds per file byte
    # FFN-wide tensors live at once per token: the fp32 graphs hold the up-projection's output,
    # its activation and the product (3); the int8 form also its int32 accumulator and the
    # float it is rescaled into (5: measured 63 KB a token on minilm-l6, 46 counted with 3)
    ffn_copies: int = 3

    def activation_bytes_per_token(self, context: int) -> int:
        """Peak live activations of one token inside a layer (fp32), attending to ``context`` keys.
        A quarter above the tensors counted: ONNX Runtime's measured peak was ~7% above them
        on minilm-l6 (bench/RESULTS.md §12)."""
        # + a decoder's additive mask row and rotary tables, fed with every token
        return int(1.25 * 4 * (self.ffn_copies * self.ffn + 8 * self.hidden + 2 * self.n_heads * context
                               + context + 2 * self.head_dim))

    def hidden_bytes(self, tokens: int) -> int:
        """Hidden states kept between layers (two copies: in and out)."""
        return 2 * 4 * self.hidden * tokens

    def kv_bytes(self, prefix: int) -> int:
        return 4 * 2 * self.n_layers * self.n_kv_heads * self.head_dim * prefix


def plan_load(shape: Shape, max_memory_mb: float | None, stream: bool | None, tokenizer_mb: float = 0.0) -> Plan:
    """Streaming mode and cache size for a budget (``None``: unbounded, all resident);
    ``tokenizer_mb`` is the loaded tokenizer's share (:func:`tokenizer_mb`)."""
    engine = ENGINE_MEMORY[shape.engine]
    resident = engine.per_file_byte * sum(shape.layer_bytes) / MB + engine.per_layer_mb * shape.n_layers
    # a streamed window: two layers held, a third being built beside them
    window = engine.per_file_byte * 2 * max(shape.layer_bytes) / MB + engine.per_layer_mb * 3
    row_mb = 4 * shape.hidden / MB
    # the head is read from an npz (a copy while it is converted), the table's pages while
    # rows are read (a row may straddle two pages)
    # and one weight matrix dequantized to fp32 by a MatMulNBits kernel, and one group of
    # sequences' rows being looked up (the distinct rows beside the group's)
    fixed = (2 * shape.head_bytes / MB + engine.runtime_mb + tokenizer_mb + CALL_SLACK_MB
             + EMBED_READ_ROWS * 2 * PAGE_BYTES / MB + 4 * shape.hidden * shape.ffn / MB + EMBED_GROUP_BYTES / MB)
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
    if shape.engine == OPENVINO:  # its rows run padded to a width step (chunking.width_chunks)
        longest = padded_width(longest, OPENVINO_WIDTH_STEP)
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


@dataclass(frozen=True)
class Call:
    """What a call needs planned: its tokens, the shared prefix's, and the longest row's."""

    tokens: int
    prefix: int
    longest: int


@dataclass(frozen=True)
class Fit:
    """A mode that holds the model (and the call asked about): its index, plan and chunk."""

    mode: int
    plan: Plan
    chunk: int | None


def first_fit(modes: list[tuple[Shape, bool]], max_memory_mb: float, tokenizer_mb: float,
              call: Call | None = None, start: int = 0) -> Fit | None:
    """The first mode from ``start`` on (a (shape, streamed) pair) whose plan holds the model
    under ``max_memory_mb`` and, given ``call``, that call; None where none does."""
    for i in range(start, len(modes)):
        shape, stream = modes[i]
        try:
            plan = plan_load(shape, max_memory_mb, stream, tokenizer_mb)
            chunk = plan_call(shape, plan, max_memory_mb, call.tokens, call.prefix, call.longest) if call else None
        except MemoryBudgetError:
            continue
        return Fit(i, plan, chunk)
    return None


def needed_mb(modes: list[tuple[Shape, bool]], tokenizer_mb: float, call: Call | None = None) -> int:
    """The smallest whole number of MB under which some mode holds the model and ``call``
    (each mode's need only grows with what it holds, so a bisection finds it)."""
    high = 64
    while first_fit(modes, high, tokenizer_mb, call) is None:
        high *= 2
        if high > 1 << 24:  # 16 TB: no budget would do
            raise MemoryBudgetError("no memory budget holds this model and call")
    low = 0  # never fits
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if first_fit(modes, mid, tokenizer_mb, call) else (mid, high)
    return high


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
