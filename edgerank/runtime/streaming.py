"""Layer sessions: all resident, or a two-layer sliding window streamed from disk.

Streaming (``stream=True``): while layer i computes, a background thread reads layer
i+1's file and builds its ONNX Runtime session; layer i is released as soon as its work is
done. At most two layers' weights are resident. The time the compute thread spends
waiting for a layer that is not ready yet is the I/O wait (``io_wait_s``).

Stacked (``spans`` given: resident OpenVINO encoder layers, the int8-static form): the
layers between two pruning checks run as one model (``engines.stacked``), loaded for the
spans a call asks for (:meth:`LayerSessions.use_spans`); ``get(i, stop)`` is the span.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from edgerank.errors import ModelFormatError
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.budget import return_freed_memory
from edgerank.runtime.engines import ORT, load_layer
from edgerank.runtime.layout import sha256_file


class LayerSessions:
    """``get(i)`` returns layer i's session; ``done(i)`` tells the window it may drop it."""

    def __init__(self, artifact: Artifact, stream: bool, threads: int, files: str | None = None,
                 engine: str = ORT, options: dict | None = None,
                 spans: list[tuple[int, int]] | None = None) -> None:
        self.artifact = artifact
        self.stream = stream
        self.files = artifact.layer_files(files)  # the stored form's layer files (edgerank.runtime.compute)
        self.engine, self.threads, self.options = engine, threads, dict(options or {})
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgerank-prefetch") if stream else None
        self.io_wait_s = 0.0
        self.load_s = 0.0
        self.peak_resident = 0  # most layers held at once (streaming)
        self.stack = spans is not None and not stream
        # layer -> session (ORT) or compiled layer (OpenVINO); stacked: (first, stop) -> compiled span
        self._resident: dict = {}
        self._hash_spans = False  # the artifact's open hashed the files; a span loaded later hashes its own
        if self.stack:
            self.use_spans(spans)  # the spans a call is expected to run: every file checked now
            self._hash_spans = True
        elif not stream:
            for i in range(artifact.n_layers):
                self._resident[i] = self._load(i)

    def _load(self, i: int):
        """Layer ``i``'s session, its file checked against the manifest first.

        A streamed layer is read again on every call, long after the artifact was checked
        at load, so it is checked again: its size, and its sha256 when the artifact was
        opened with ``verify=True`` (hashing runs in the prefetch thread beside the
        previous layer's compute, at ~1 GB/s, well under the session's build time). A file
        replaced between the check and the load is caught by its identity (inode, size,
        mtime) before and after. The session is built from the path, not from the hashed
        bytes: from bytes ONNX Runtime kept 2.2x the file resident instead of 1.2x."""
        return self._load_span(i, i + 1, stacked=False)

    def _load_span(self, first: int, stop: int, stacked: bool = True):
        """Layers ``first`` to ``stop - 1`` as one session (:func:`engines.stacked`), or layer
        ``first``'s own (``stacked=False``), each file checked as :meth:`_load` says."""
        t0 = time.perf_counter()
        rels = self.files[first:stop]
        paths = [self.artifact.path / rel for rel in rels]
        before = []
        for rel, path in zip(rels, paths):
            info = self.artifact.manifest["files"][rel]
            before.append(self._identity(path, rel))
            if before[-1][1] != info["size"]:
                raise ModelFormatError(f"{self.artifact.path}: {rel} is {before[-1][1]} bytes, the manifest says "
                                       f"{info['size']}: the artifact changed after it was loaded")
            if (self.stream or self._hash_spans) and self.artifact.verified and sha256_file(path) != info["sha256"]:
                raise ModelFormatError(f"{self.artifact.path}: {rel} does not match its sha256 in manifest.json: "
                                       "the file was modified after the artifact was loaded")
        try:
            sess = load_layer(paths if stacked else paths[0], self.engine, self.threads, **self.options)
        except Exception as e:  # onnxruntime raises InvalidProtobuf, NoSuchFile, Fail, InvalidGraph, ...
            raise ModelFormatError(f"{self.artifact.path}: {', '.join(rels)} is not a readable ONNX layer for "
                                   f"{self.engine} ({type(e).__name__}: {str(e).strip()[:200]})") from e
        self._check_inputs(sess, rels[0])
        for rel, path, was in zip(rels, paths, before):
            if self._identity(path, rel) != was:
                raise ModelFormatError(f"{self.artifact.path}: {rel} changed while it was being loaded")
        with self._lock:
            self.load_s += time.perf_counter() - t0
        return sess

    def covering(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Stacked: the spans to run a call that needs ``spans``: the held ones where they cut
        the layers at least where ``spans`` do (a finer split runs the same), else ``spans``,
        loaded (:meth:`use_spans`)."""
        held = sorted(self._resident)
        if {first for first, _ in spans} <= {first for first, _ in held}:
            return held
        self.use_spans(spans)
        return spans

    def use_spans(self, spans: list[tuple[int, int]]) -> None:
        """Stacked: hold the spans ``spans`` (first layer, stop) and no others (a span no
        longer asked for would hold its weights twice over)."""
        for key in [k for k in self._resident if k not in spans]:
            del self._resident[key]
        for key in spans:
            if key not in self._resident:
                self._resident[key] = self._load_span(*key)

    def _check_inputs(self, sess, rel: str) -> None:
        """The layer graph's fixed sizes must be the manifest's: a mismatch would fail deep in
        ONNX Runtime at the first call."""
        dims = self.artifact.manifest["dims"]
        want = {"hidden": (-1, dims["hidden"]), "cos": (-1, dims["head_dim"]),
                "past_key": (1, dims["n_kv_heads"])}
        for inp in sess.get_inputs():
            if inp.name in want:
                axis, size = want[inp.name]
                got = inp.shape[axis] if -len(inp.shape) <= axis < len(inp.shape) else None
                if isinstance(got, int) and got != size:
                    raise ModelFormatError(f"{self.artifact.path}: {rel} takes {inp.name} of size {got} on axis "
                                           f"{axis}; the manifest's dims say {size}")

    def _identity(self, path, rel: str) -> tuple[int, int, int]:
        try:
            st = os.stat(path)
        except OSError as e:
            raise ModelFormatError(f"{self.artifact.path}: {rel} cannot be read ({e.strerror or e}); "
                                   "the artifact changed after it was loaded") from e
        return st.st_ino, st.st_size, st.st_mtime_ns

    def prefetch(self, i: int) -> None:
        """Start loading layer ``i`` in the background (streaming only; no-op otherwise)."""
        if self.stream and 0 <= i < self.artifact.n_layers and i not in self._pending:
            self._pending[i] = self._pool.submit(self._load, i)
            self.peak_resident = max(self.peak_resident, len(self._pending))

    def get(self, i: int, stop: int | None = None):
        """Layer ``i``'s session; stacked, the span from ``i`` to ``stop`` (default ``i + 1``)."""
        if self.stack:
            return self._resident[(i, stop or i + 1)]
        if not self.stream:
            return self._resident[i]
        self.prefetch(i)
        t0 = time.perf_counter()
        try:
            sess = self._pending[i].result()
        except Exception:
            self.release()  # a layer that cannot be loaded ends the call: hold nothing after it
            raise
        self.io_wait_s += time.perf_counter() - t0
        return sess

    def done(self, i: int, stop: int | None = None) -> None:
        """Layer ``i`` (stacked: the span to ``stop``) has no more work in this call: drop it
        when streaming, else free what its engine keeps between runs (OpenVINO's buffers)."""
        if not self.stream:
            getattr(self._resident[(i, stop or i + 1) if self.stack else i], "release_memory", lambda: None)()
        else:
            fut = self._pending.pop(i, None)
            if fut is not None:
                try:
                    fut.result()  # let a load in flight finish before dropping it
                except Exception:  # noqa: BLE001 - a failed load of a layer no longer wanted
                    pass
                del fut
                return_freed_memory()  # the dropped layer's pages, before the next one loads

    def reset_counters(self) -> None:
        self.io_wait_s = self.load_s = 0.0

    def release(self) -> None:
        """Drop every streamed layer still held (a call ended early, or is over)."""
        for i in list(self._pending):
            self.done(i)

    def close(self) -> None:
        self.release()
        self._resident.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
