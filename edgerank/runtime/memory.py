"""Process memory accounting: current RSS and the peak RSS over a stretch of work."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:  # one small read, cheap enough to sample every millisecond
        return int(_STATM.read_text().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return psutil.Process().memory_info().rss / 2**20


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_mb() -> float:
    """This process's peak RSS over its whole life, in MiB.

    On Linux this is ``VmHWM`` (of this process's own memory map). ``ru_maxrss`` is not
    used there because it keeps the parent's peak across fork + exec: a worker spawned by a
    parent that had just converted a model would report the parent's memory as its own.
    edgerank never resets either counter (see :class:`PeakRSS`).
    """
    hwm = _vm_hwm_mb()
    if hwm is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return hwm


class PeakRSS:
    """Peak RSS inside a ``with`` block, in MiB (``.peak_mb``, ``.baseline_mb``).

    Measured without touching the process's own counters: a library must not change what
    its host, or a tool watching it (``VmHWM``, ``ru_maxrss``, ``time -v``), measures, so
    the kernel's high-water mark is never reset. Instead a thread samples the RSS every
    ``interval_s`` for the block's duration. The figure is therefore the largest RSS
    *sampled*: a spike shorter than the interval can be missed, except when the block sets
    a new high for the whole process, which the kernel's ``VmHWM`` (read at entry and exit)
    records exactly and which is then used.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._hwm_at_entry: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        self.baseline_mb = rss_mb()
        self._hwm_at_entry = _vm_hwm_mb()
        self.peak_mb = self.baseline_mb
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="edgerank-peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        hwm = _vm_hwm_mb()
        if hwm is not None and self._hwm_at_entry is not None and hwm > self._hwm_at_entry:
            self.peak_mb = max(self.peak_mb, hwm)  # the process's new high was reached in the block

    @property
    def delta_mb(self) -> float:
        """Peak above the RSS at entry: what the work itself added."""
        return max(0.0, self.peak_mb - self.baseline_mb)
