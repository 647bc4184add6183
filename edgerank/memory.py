"""Process memory accounting: current RSS and the peak RSS over a stretch of work."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak RSS inside a ``with`` block, in MiB (``.peak_mb``, ``.baseline_mb``).

    On Linux the kernel's own high-water mark is reset on entry (``clear_refs`` 5) and
    read on exit, so nothing is missed between samples. Elsewhere a thread samples psutil
    every few milliseconds.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        self.baseline_mb = rss_mb()
        try:
            _CLEAR_REFS.write_text("5")
            self._exact = _vm_hwm_mb() is not None
        except OSError:
            self._exact = False
        if not self._exact:
            self.peak_mb = self.baseline_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process(os.getpid())
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        if self._exact:
            self.peak_mb = max(_vm_hwm_mb() or 0.0, rss_mb())
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def delta_mb(self) -> float:
        """Peak above the RSS at entry: what the work itself added."""
        return max(0.0, self.peak_mb - self.baseline_mb)
