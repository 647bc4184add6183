"""Token embeddings read row by row from the artifact's table, with an LRU cache.

Only the rows of tokens a call uses are read (and dequantized); a query of 20 documents
x 512 tokens touches a few percent of a 150k vocabulary. The cache keeps recently used
rows in fp32, bounded by ``max_rows``.

The table is read with ``os.pread`` on a descriptor held open, never memory-mapped: a page
of a mapped file that was truncated under the process kills it with SIGBUS, where a short
read is a :class:`ModelFormatError`. Nothing of the file stays in the process's memory
beyond one read of ``EMBED_READ_ROWS`` rows and the cached rows.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgerank.errors import ModelFormatError
from edgerank.runtime.budget import EMBED_READ_ROWS

# Needed rows at most this many bytes apart are read in one call, the bytes between them
# too: a system call costs about what reading a page does. It bounds what one read of
# EMBED_READ_ROWS rows holds at once as the memory-mapped table's pages were bounded
PAGE = 4096


class TableFile:
    """A 2-D ``.npy`` table on disk, read by rows through an open descriptor. The file's
    size and modification time are checked before every read: a table truncated, grown or
    rewritten after load is a :class:`ModelFormatError`, not a signal or other rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.shape, self.dtype, self._offset = _npy_header(self._file, self.path)
            self.row_nbytes = int(self.shape[1]) * self.dtype.itemsize
            self._stamp = self._stat()
            if self._stamp[0] != self._offset + self.shape[0] * self.row_nbytes:
                raise ModelFormatError(f"{self.path} holds {self._stamp[0]} bytes; its header says "
                                       f"{self._offset + self.shape[0] * self.row_nbytes} (a truncated table)")
        except BaseException:
            self._file.close()
            raise

    ndim = 2  # checked at open; read as a table's (layerwise checks the shape against the manifest)

    def _stat(self) -> tuple[int, int]:
        st = os.fstat(self._file.fileno())
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        """Raise :class:`ModelFormatError` if the file changed since it was opened."""
        if self._stat() != self._stamp:
            raise ModelFormatError(f"{self.path} changed while the model was loaded (its size or time "
                                   "differs from load): reload the model")

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` (sorted, distinct, in range) as ``[len(ids), columns]``; call
        :meth:`check` first. Rows less than a page apart are read in one call, the rows
        between them with them: a call costs about what a page of bytes does."""
        starts, stops = _runs(ids, max(0, PAGE // self.row_nbytes))
        first = ids[starts]
        counts = ids[stops - 1] + 1 - first
        at = np.cumsum(counts) - counts  # where each run's rows start in the buffer
        buf = np.empty(int(counts.sum()) * self.row_nbytes, dtype=np.uint8)
        view = memoryview(buf)
        for f, n, a in zip(first.tolist(), counts.tolist(), at.tolist()):
            self._read_into(view[a * self.row_nbytes: (a + n) * self.row_nbytes], f)
        index = ids + np.repeat(at - first, stops - starts)
        return buf.view(self.dtype).reshape(-1, self.shape[1])[index]

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (clipped to the table), in one read; checks the file first."""
        self.check()
        stop = min(stop, self.shape[0])
        buf = np.empty(max(0, stop - start) * self.row_nbytes, dtype=np.uint8)
        self._read_into(memoryview(buf), start)
        return buf.view(self.dtype).reshape(-1, self.shape[1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` in any order, repeats allowed; checks the file first."""
        self.check()
        uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= self.shape[0]):
            raise ValueError(f"row id out of range for a {self.shape[0]}-row table")
        return self.take(uniq)[inverse.reshape(-1)]

    def _read_into(self, view: memoryview, first: int) -> None:
        offset = self._offset + first * self.row_nbytes
        if hasattr(os, "preadv"):
            got = os.preadv(self._file.fileno(), [view], offset)
        else:
            data = os.pread(self._file.fileno(), len(view), offset)
            got = len(data)
            view[:got] = data
        if got != len(view):
            raise ModelFormatError(f"{self.path} ends before row {first + len(view) // self.row_nbytes} of "
                                   f"{self.shape[0]}: the file was truncated while the model was loaded; "
                                   "reload the model")

    def close(self) -> None:
        self._file.close()


def _runs(ids: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)``: slices of the sorted ``ids`` read in one call each, rows at most
    ``gap`` rows apart."""
    breaks = np.flatnonzero(np.diff(ids) > gap + 1) + 1
    return np.concatenate([[0], breaks]), np.concatenate([breaks, [len(ids)]])


def _npy_header(f, path: Path) -> tuple[tuple[int, int], np.dtype, int]:
    """(shape, dtype, offset of the first row) of a C-ordered 2-D ``.npy`` file."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read[version](f)
    except (ValueError, KeyError, EOFError) as e:
        raise ModelFormatError(f"{path} is not a readable table (not a .npy file: {e})") from e
    if len(shape) != 2 or fortran or dtype.hasobject:
        raise ModelFormatError(f"{path} holds a {'Fortran-ordered ' if fortran else ''}{dtype} array of shape "
                               f"{shape}; an embedding table is a C-ordered 2-D array of numbers")
    return (int(shape[0]), int(shape[1])), dtype, f.tell()


class EmbeddingRows:
    """``rows(ids) -> [len(ids), hidden] fp32``, reading only the rows it needs."""

    def __init__(self, table: Path, scales: Path | None, max_rows: int = 8192) -> None:
        self._table = TableFile(table)
        self._scales = np.load(scales) if scales is not None and scales.is_file() else None
        self.vocab, self.hidden = self._table.shape
        self.max_rows = int(max_rows)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def shape(self) -> tuple[int, int]:
        return self._table.shape

    @property
    def row_bytes(self) -> int:
        return self.hidden * 4

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range for a {self.vocab}-row embedding table")
        self._table.check()  # rows already cached come from a file that is still the one loaded
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
            for at in range(0, len(need), EMBED_READ_ROWS):  # bounded: one read's rows at a time
                rows[at: at + EMBED_READ_ROWS] = self._table.take(need[at: at + EMBED_READ_ROWS])
            if self._scales is not None:
                rows *= self._scales[need, None]
            out[missing] = rows
            for t, row in zip(need.tolist(), rows):
                self._cache[t] = row
            while len(self._cache) > self.max_rows:
                self._cache.popitem(last=False)
        return out[inverse].reshape(*ids.shape, self.hidden)

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.row_bytes

    def close(self) -> None:
        self._table.close()
