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


# The largest VmHWM seen before PeakRSS reset it: resetting the kernel's high-water mark
# for one call must not lose the process's peak before that call.
_peak_before_resets_mb = 0.0


def process_peak_mb() -> float:
    """This process's peak RSS over its whole life, in MiB.

    On Linux this is ``VmHWM`` (of this process's own memory map) combined with what it
    was before each :class:`PeakRSS` reset it. ``ru_maxrss`` is not used there because it
    keeps the parent's peak across fork + exec: a worker spawned by a parent that had just
    converted a model would report the parent's memory as its own.
    """
    hwm = _vm_hwm_mb()
    if hwm is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return max(hwm, _peak_before_resets_mb)


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
        global _peak_before_resets_mb
        self.baseline_mb = rss_mb()
        _peak_before_resets_mb = max(_peak_before_resets_mb, _vm_hwm_mb() or 0.0)
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
