"""Length-bucketed chunks: which sequences run together, so padding stays small."""

from __future__ import annotations

import numpy as np


def length_chunks(lengths, budget: int, rows=None, min_fill: float = 0.0) -> list[np.ndarray]:
    """Indices (``rows``, default all) grouped longest first. A chunk's padded size
    (width x count) stays within ``budget`` tokens, and a row shorter than ``min_fill`` of
    the chunk's width starts a new chunk (``min_fill=0.75`` caps padding at a quarter of
    any row). A row longer than the budget gets a chunk of its own."""
    lengths = np.asarray(lengths)
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    chunks, cur, width = [], [], 0
    for i in order.tolist():
        n = int(lengths[i])
        if cur and (width * (len(cur) + 1) > budget or n < min_fill * width):
            chunks.append(np.array(cur))
            cur = []
        if not cur:
            width = n
        cur.append(i)
    if cur:
        chunks.append(np.array(cur))
    return chunks


def padded_width(length, step: int):
    """``length`` (an int, or an array of them) rounded up to a multiple of ``step``."""
    return -(-length // step) * step


def width_chunks(lengths, budget: int, step: int, rows=None) -> list[np.ndarray]:
    """Indices (``rows``, default all) grouped by the width each runs at, its length
    rounded up to ``step`` (:func:`padded_width`), widest first, each group cut into chunks
    of at most ``budget`` padded tokens (one row at least). A row's width then depends on
    its own length alone, never on its chunk-mates'."""
    lengths = np.asarray(lengths)
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    widths = padded_width(lengths[order], step)  # widest first
    chunks: list[np.ndarray] = []
    for width in np.unique(widths)[::-1]:
        group, per = order[widths == width], max(1, budget // int(width))
        chunks += [group[j:j + per] for j in range(0, len(group), per)]
    return chunks
