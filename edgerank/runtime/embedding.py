"""Token embeddings read row by row from the artifact's memory-mapped table, with an LRU cache.

Only the rows of tokens a call uses are read (and dequantized); a query of 20 documents
x 512 tokens touches a few percent of a 150k vocabulary. The cache keeps recently used
rows in fp32, bounded by ``max_rows``.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgerank.runtime.budget import EMBED_READ_ROWS


class EmbeddingRows:
    """``rows(ids) -> [len(ids), hidden] fp32``, reading only the rows it needs."""

    def __init__(self, table: Path, scales: Path | None, max_rows: int = 8192) -> None:
        self._table = np.load(table, mmap_mode="r")
        self._scales = np.load(scales) if scales is not None and scales.is_file() else None
        self.hidden = int(self._table.shape[1])
        self.vocab = int(self._table.shape[0])
        self.max_rows = int(max_rows)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def row_bytes(self) -> int:
        return self.hidden * 4

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range for a {self.vocab}-row embedding table")
        uniq, inverse = np.unique(ids, return_inverse=True)
        out = np.empty((len(uniq), self.hidden), dtype=np.float32)
        missing = []
        for j, t in enumerate(uniq.tolist()):
            row = self._cache.get(t)
            if row is None:
                missing.append(j)
            else:
                self._cache.move_to_end(t)
                out[j] = row
        if missing:
            need = uniq[missing]
            rows = np.empty((len(need), self.hidden), dtype=np.float32)
            for at in range(0, len(need), EMBED_READ_ROWS):  # fancy index: reads just these rows
                rows[at: at + EMBED_READ_ROWS] = self._table[need[at: at + EMBED_READ_ROWS]]
                self._release_pages()
            if self._scales is not None:
                rows *= self._scales[need, None]
            out[missing] = rows
            for t, row in zip(need.tolist(), rows):
                self._cache[t] = row
            while len(self._cache) > self.max_rows:
                self._cache.popitem(last=False)
        return out[inverse].reshape(*ids.shape, self.hidden)

    def _release_pages(self) -> None:
        """Drop the table's pages from this process's RSS (they stay in the page cache):
        pages read through the map count as the process's memory, up to the whole table,
        which the budget does not hold (0.3 GB for a 128k x 3072 vocabulary)."""
        mm = getattr(self._table, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.row_bytes
