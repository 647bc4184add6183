"""Smoothing for a decoder's int8-compute form: move activation outliers into the weights.

The int8 form quantizes each projection's input with one scale per token
(``onnx_graphs``), so a few channels that run far larger than the rest (decoders
have them; SmolLM2's int8 form ranked like its int4 form at Spearman 0.29, RESULTS §18.4)
leave the other channels a handful of codes. SmoothQuant (Xiao et al., 2023) divides input
channel j by s_j and multiplies the weight column j that reads it by s_j. In a Llama/Qwen
layer every projection input is something the previous weights scale linearly, so the
division folds into them and the fp32 function is unchanged:

    attention input  RMSNorm(h) * g           g / s;  q, k, v columns * s
    o_proj input     softmax(q k^T) v         v_proj rows (and bias) / s;  o_proj columns * s
                                              (s per KV channel, repeated over its query heads)
    MLP input        RMSNorm(h) * g2          g2 / s;  gate, up columns * s
    down_proj input  silu(gate) * up          up rows / s;  down columns * s

with s_j = max|X_j|^alpha / max|W_j|^(1-alpha). The activation maxima come from running
calibration pairs through each fp32 layer (``decoder_layer(..., taps=True)``): the
built-in sample's queries with another query's passages, so the pairs the fit check
scores (``verify.form_fit``) are not the ones calibrated on.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgerank.runtime import layout
from edgerank.runtime.cpu import default_threads
from edgerank.runtime.engines import session_options
from edgerank.converters.onnx_graphs import TAPS

# how much of the outliers moves into the weights: the paper's default is 0.5; on SmolLM2's
# int8 form (Spearman against its int4 form on the sample) 0.5 gave 0.49, 0.7 0.73, 0.85 0.18
# (RESULTS §18.7)
ALPHA = 0.7
ATTN, O, MLP, DOWN = TAPS
CALIBRATION_PAIRS = 32  # of the sample's 64 (query, other query's passage) pairs
CALIBRATION_ROWS = 8  # pairs per fp32 call
MAX_FACTOR = 100.0  # the factors stay within [1/100, 100]


def calibration_tokens(tokenizer, spec, sample) -> list[list[int]]:
    """Token ids of the calibration pairs: query i of ``sample`` with the passages of
    query i+1, through the family's template."""
    from edgerank.runtime.tokenization import encode_pairs

    seqs = []
    for i, (query, _) in enumerate(sample):
        passages = sample[(i + 1) % len(sample)][1]
        seqs += encode_pairs(spec, tokenizer, query, passages).sequences
    step = max(1, len(seqs) // CALIBRATION_PAIRS)
    return seqs[::step][:CALIBRATION_PAIRS]


class Calibration:
    """The calibration pairs' hidden states, carried from layer to layer through the fp32
    graphs, and each layer's per-channel activation maxima."""

    def __init__(self, sequences: list[list[int]], embedding: np.ndarray, rope) -> None:
        lengths = np.array([len(s) for s in sequences])
        T = int(lengths.max())
        ids = np.zeros((len(sequences), T), np.int64)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = s
        self.valid = np.arange(T)[None] < lengths[:, None]  # [B,T]
        self.hidden = np.asarray(embedding[ids], dtype=np.float32)
        self.cos, self.sin = rope(np.broadcast_to(np.arange(T), ids.shape))
        self.mask = layout.decoder_mask(lengths, T)

    def run(self, model, n_kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
        """Run the fp32 ``taps`` graph of one layer, ``CALIBRATION_ROWS`` pairs per call (a
        3B model's MLP taps are ~0.2 GB for 32 pairs); keeps its output as the next layer's
        input and returns the abs maxima per channel of each tap (real tokens only)."""
        sess = ort.InferenceSession(model.SerializeToString(), session_options(default_threads()),
                                    providers=["CPUExecutionProvider"])
        empty = layout.no_past(n_kv_heads, head_dim)
        maxima: dict[str, np.ndarray] = {}
        for a in range(0, len(self.hidden), CALIBRATION_ROWS):
            rows = slice(a, a + CALIBRATION_ROWS)
            outs = sess.run([layout.HIDDEN_OUT, *TAPS], layout.decoder_inputs(
                self.hidden[rows], self.cos[rows], self.sin[rows], self.mask[rows], empty))
            self.hidden[rows] = outs[0]
            valid = self.valid[rows]
            for tap, t in zip(TAPS, outs[1:]):
                m = np.abs(t[valid]).max(axis=0)
                maxima[tap] = np.maximum(maxima[tap], m) if tap in maxima else m
        return maxima


def _factors(x_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s per input channel for the columns of ``weights`` ([out, in] each)."""
    w_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
    # bounded: a channel all but silent in calibration must not become the outlier at run time
    return np.clip(s, 1 / MAX_FACTOR, MAX_FACTOR).astype(np.float32)


def smooth(w: dict[str, np.ndarray], maxima: dict[str, np.ndarray], n_heads: int, n_kv_heads: int,
           head_dim: int, alpha: float | None = None) -> dict[str, np.ndarray]:
    """A copy of one layer's HF tensors with the four smoothings folded in (exact in fp32).
    An unmerged LoRA update (``.lora_A`` / ``.lora_B``) is scaled with its weight."""
    alpha = ALPHA if alpha is None else alpha
    w = dict(w)

    def scale(name: str, s: np.ndarray, axis: int, lora: str | None = None) -> None:
        """Multiply ``name``'s ``axis`` (0 rows, 1 columns) by ``s``; and its LoRA factor's."""
        for key in (name, f"{name}.{lora}") if lora else (name,):
            if key in w:
                shape = (-1, 1) if axis == 0 else (1, -1)
                w[key] = (w[key].astype(np.float64) * s.reshape(shape if w[key].ndim == 2 else -1)).astype(np.float32)

    def fold_norm(norm: str, projs: list[str], tap: str) -> None:
        names = [f"{p}.weight" for p in projs]
        s = _factors(maxima[tap], [w[n] for n in names], alpha).astype(np.float64)
        scale(f"{norm}.weight", 1 / s, 0)
        for n in names:
            scale(n, s, 1, "lora_A")

    fold_norm("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ATTN)
    fold_norm("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], MLP)

    # o_proj: one factor per KV channel (kvh, d), shared by the query heads that read it
    group = n_heads // n_kv_heads
    o = "self_attn.o_proj.weight"
    per_kv = maxima[O].reshape(n_kv_heads, group, head_dim).max(axis=1).reshape(-1)
    o_cols = np.abs(w[o]).reshape(w[o].shape[0], n_kv_heads, group, head_dim).max(axis=2).reshape(w[o].shape[0], -1)
    s = _factors(per_kv, [o_cols], alpha).astype(np.float64)
    scale("self_attn.v_proj.weight", 1 / s, 0, "lora_B")
    scale("self_attn.v_proj.bias", 1 / s, 0)
    scale(o, np.repeat(s.reshape(n_kv_heads, 1, head_dim), group, axis=1).reshape(-1), 1, "lora_A")

    # down_proj: its input is silu(gate) * up, linear in up's rows
    s = _factors(maxima[DOWN], [w["mlp.down_proj.weight"]], alpha).astype(np.float64)
    scale("mlp.up_proj.weight", 1 / s, 0, "lora_B")
    scale("mlp.down_proj.weight", s, 1, "lora_A")
    return w
