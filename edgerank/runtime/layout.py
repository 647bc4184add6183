"""The artifact's layout: its file names, its layer graphs' input and output names, its
format and version, and how its files are checked. One home, imported by the writer
(``edgerank.converters.onnx_export``, ``onnx_graphs``) and the reader (``artifact``,
``backends.layerwise``), as gguf-py's ``constants.py`` serves its writer and reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

FORMAT = "edgerank-artifact"
GRAPH_FORMAT = "edgerank-graph"  # the whole model as one standard ONNX graph (converters.graph_export)
FORMAT_VERSION = 1  # what the converter writes
SUPPORTED_VERSIONS = (1,)  # what the runtime reads

# beside a converted model (an artifact folder or a GGUF file): the converter's report
REPORT_SUFFIX = ".conversion_report.json"

# files, relative to the artifact folder
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
EMBED = "embed.npy"  # int8 rows (with EMBED_SCALE) or fp32
EMBED_SCALE = "embed_scale.npy"  # one fp32 scale per int8 row
HEAD = "head.npz"
# the full LM head of an untied decoder, stored like the embedding (int8 rows + scales, or
# fp32): what generating an explanation needs. Tied decoders reuse EMBED; encoders have none.
LM_HEAD = "lm_head.npy"
LM_HEAD_SCALE = "lm_head_scale.npy"
READOUTS = "readouts.npz"  # optional: per-layer readouts fitted by ``calibrate --fit-readouts``
LAYERS_DIR = "layers"


def layer_file(i: int, form: str | None = None) -> str:
    """Layer ``i``'s graph, relative to the artifact folder: in the artifact's own weight
    format, or (``form``, e.g. ``"int8"``) in another form the runtime may choose."""
    return f"{LAYERS_DIR}/layer_{i:02d}{'.' + form if form else ''}.onnx"


# layer graph inputs: hidden states [B,T,H] and the additive attention mask; decoders also
# take the rotary tables [B,T,D] and the past's keys/values [1 or B,KVH,1,P,D] (the shared
# prefix; batched decoding adds each row's own)
HIDDEN, MASK, COS, SIN, PAST_KEY, PAST_VALUE = "hidden", "mask", "cos", "sin", "past_key", "past_value"
# decoder layers: an optional additive mask over the past's positions (default: all visible),
# so rows with pasts of different lengths (batched decoding) can share a call
PAST_MASK = "past_mask"
# the inputs a layer graph takes, listed in the manifest (``layer_inputs``); an artifact
# whose list lacks PAST_MASK predates batched decoding
DECODER_INPUTS = (HIDDEN, COS, SIN, MASK, PAST_KEY, PAST_VALUE, PAST_MASK)
ENCODER_INPUTS = (HIDDEN, MASK)
NEG = np.float32(-1e9)  # additive mask value: exp() of it is exactly 0 next to real scores


def decoder_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """A decoder layer graph's ``MASK`` [B,1,1,T,T] for rows of ``lengths`` real tokens
    padded to ``width``: causal, and every key past a row's length hidden."""
    t = np.arange(width)
    seen = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < np.asarray(lengths)[:, None, None])
    return np.where(seen, np.float32(0), NEG)[:, None, None]


def no_past(n_kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Past keys and values of length 0: what a decoder layer attends to before any token."""
    empty = np.zeros((1, n_kv_heads, 1, 0, head_dim), np.float32)
    return empty, empty


def decoder_inputs(hidden: np.ndarray, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
                   past: tuple[np.ndarray, np.ndarray], past_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A decoder layer graph's inputs by name: hidden states [B,T,H], the rotary tables [B,T,D],
    the additive mask [B,1,1,T,T] (:func:`decoder_mask`), the past's keys and values
    [1 or B,KVH,1,P,D] (:func:`no_past` for none) and, where rows' pasts differ in length, the
    additive mask over the past's positions."""
    feeds = {HIDDEN: hidden, COS: cos, SIN: sin, MASK: mask, PAST_KEY: past[0], PAST_VALUE: past[1]}
    if past_mask is not None:
        feeds[PAST_MASK] = past_mask
    return feeds


def encoder_inputs(hidden: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """An encoder layer graph's inputs by name: hidden states [B,T,H] and the additive mask
    [B,1,1,T] that hides every key past a row's ``lengths``."""
    valid = np.arange(hidden.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return {HIDDEN: hidden, MASK: np.where(valid, 0.0, NEG).astype(np.float32)[:, None, None, :]}


# layer graph outputs: new hidden states; decoders also this call's own keys/values
HIDDEN_OUT, KEY, VALUE = "hidden_out", "key", "value"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (artifacts, wheels and models are checked by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
