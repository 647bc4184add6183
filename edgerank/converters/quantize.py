"""Weight quantization into ONNX Runtime's layouts: block-wise affine codes for
``MatMulNBits``, and per-channel symmetric int8 for the int8 form's ``MatMulIntegerToFloat``.

Each block of ``block`` weights along the input dimension is stored as unsigned
``bits``-bit codes ``q`` with a float scale and a zero point (float for 4 bits; an
integer for 8 bits, which is all ORT's 8-bit CPU kernels take):
``w = (q - zero_point) * scale``, where ``scale = (max - min) / (2**bits - 1)`` and
``zero_point = -min / scale``. This is the same grid as GGUF's Q4_1 (min + q * d), so a
Q4_1 GGUF re-exports without loss, and a float model gets plain round-to-nearest int4.
"""

from __future__ import annotations

import numpy as np


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` is an HF weight ``[N out, K in]``; returns (B ``[N, K/block, block*bits/8]`` uint8,
    scales ``[N * K/block]`` fp32, zero points ``[N * K/block]``: fp32 for 4 bits, uint8 for 8). K is zero-padded up
    to a multiple of ``block``; MatMulNBits ignores the padding."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits codes are 4 or 8 bits here, not {bits}")
    n, k = w.shape
    kb = -(-k // block)
    if kb * block != k:
        w = np.concatenate([w, np.zeros((n, kb * block - k), w.dtype)], axis=1)
    blk = w.reshape(n, kb, block).astype(np.float32)
    lo, hi = blk.min(axis=-1), blk.max(axis=-1)
    if bits == 8:  # ORT's 8-bit kernels take integer zero points only: the range must hold 0
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    flat = scale == 0
    scale[flat] = 1.0
    zero = -lo / scale
    zero[flat] = -lo[flat]  # constant block: code 0 decodes to the constant
    if bits == 8:
        zero = np.clip(np.rint(zero), 0, levels)
    q = np.clip(np.rint(blk / scale[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # element 2i in the low nibble
    zero = zero.reshape(-1).astype(np.uint8 if bits == 8 else np.float32)
    return np.ascontiguousarray(q), scale.reshape(-1).astype(np.float32), zero


def dequantize_blocks(b: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blocks` (for tests and reports): ``[N, K]`` fp32."""
    n, kb = b.shape[:2]
    q = b.astype(np.float32)
    if bits == 4:
        q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, kb, -1).astype(np.float32)
    w = (q - zeros.reshape(n, kb, 1).astype(np.float32)) * scales.reshape(n, kb, 1)
    return w.reshape(n, -1)[:, :k]


INT8_CODE_MAX = 63  # 7-bit codes: no u8 x s8 product pair can overflow 16 bits (255*63*2 < 2**15)


def quantize_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` is an HF weight ``[N out, K in]``; returns int8 codes ``[K, N]`` (the layout
    ``MatMulIntegerToFloat`` multiplies) and one absmax scale per output channel ``[N]``:
    ``w[n, k] = codes[k, n] * scales[n]``, symmetric (zero point 0). Codes stay within
    ±INT8_CODE_MAX: on CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add products in
    pairs in 16 bits, which saturate with full 8-bit codes (ORT's ``reduce_range``); with
    7-bit codes every kernel (AVX2, VNNI, AMX) sums exactly, so a score does not depend on
    which CPU computed it."""
    w = np.asarray(w, dtype=np.float32)
    scales = np.abs(w).max(axis=1) / INT8_CODE_MAX
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(w / scales[:, None]), -INT8_CODE_MAX, INT8_CODE_MAX).astype(np.int8)
    return np.ascontiguousarray(codes.T), scales.astype(np.float32)
