"""What this CPU is and can do: its name, the instruction-set features that decide which
compute form is fastest (int8 dot products, bf16 matrix units), and its physical cores.

x86 Linux lists them as ``flags`` in ``/proc/cpuinfo``; ARM Linux as ``Features`` (with no
``model name`` on most ARM kernels). A measurement taken on one CPU is valid for another only
when :func:`cpu_id` agrees.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import psutil

# the features named in cpu_id(): those that change which form runs fastest
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")
# bf16 matrix work in hardware: AVX512-BF16 dot products (Zen 4, Cooper Lake on), AMX tiles
# (Sapphire Rapids on), ARMv8.6 BF16 (Graviton 3, Apple M2 on)
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")


def default_threads() -> int:
    """Threads a model runs with unless told: one per physical core."""
    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, features) from ``/proc/cpuinfo``; the platform's names elsewhere."""
    name, features = "", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not features:
                features = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), features


def features() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` or ARM ``Features``)."""
    return _cpuinfo()[1]


def is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def has_bf16() -> bool:
    """Whether bf16 matrix work runs in hardware here (emulated bf16 is slower than fp32)."""
    return any(f in features() for f in BF16_FEATURES)


@functools.cache
def cpu_id() -> str:
    """The CPU's name and the features that decide compute speed: what a measurement is valid for."""
    name, found = _cpuinfo()
    named = [f for f in (ARM_FEATURES if is_arm() else X86_FEATURES) if f in found]
    return f"{name} [{' '.join(named) or 'no int8 dot-product flags'}]"
