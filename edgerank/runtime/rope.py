"""Rotary position tables (HF rotate-half layout), including Llama 3's frequency scaling."""

from __future__ import annotations

import math

import numpy as np


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair inverse frequencies, as transformers computes them (fp32)."""
    f = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return f.astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (default and llama3 are)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / f
    scaled = np.where(wavelen > low_wavelen, f / factor, f)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RopeTable:
    """cos/sin rows for positions, computed once up to the longest position seen."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        self.freq = inv_freq(head_dim, theta, scaling)
        self._cos = self._sin = np.zeros((0, head_dim), np.float32)

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        need = int(positions.max()) + 1 if positions.size else 0
        if need > len(self._cos):
            angles = np.arange(max(need, 2 * len(self._cos)), dtype=np.float32)[:, None] * self.freq[None, :]
            emb = np.concatenate([angles, angles], axis=-1)
            self._cos, self._sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
        return self._cos[positions], self._sin[positions]
