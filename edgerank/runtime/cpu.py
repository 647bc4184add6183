"""What this CPU is and can do: its name, the instruction-set features that decide which
compute form is fastest (int8 dot products, bf16 matrix units), and its physical cores.

x86 Linux lists them as ``flags`` in ``/proc/cpuinfo``; ARM Linux as ``Features`` (with no
``model name`` on most ARM kernels: the name is then built from ``CPU implementer`` and
``CPU part``). Where ``/proc/cpuinfo`` has no ``Features`` on ARM (macOS, or qemu-user
before 8.1, which shows the host's x86 ``/proc/cpuinfo``), the features come from the
kernel's hardware capabilities (``getauxval``, which qemu-user answers for the CPU it
emulates) or macOS's ``sysctl hw.optional.arm``. A measurement taken on one CPU is valid
for another only when :func:`cpu_id` agrees.

An aarch64 Python under user-mode emulation (qemu-user on an x86 host) runs every
instruction through a translator: its timings say nothing about a real ARM CPU, so the
compute form is chosen there by :func:`rule_form` instead of by measuring (docs/platforms.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil

# the features named in cpu_id(): those that change which form runs fastest
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")
# bf16 matrix work in hardware: AVX512-BF16 dot products (Zen 4, Cooper Lake on), AMX tiles
# (Sapphire Rapids on), ARMv8.6 BF16 (Graviton 3, Apple M2 on)
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
# int8 dot products on ARM: SDOT/UDOT (ARMv8.2 DotProd: Cortex-A76, Apple M1, Graviton 2 on)
# and the int8 matrix multiply SMMLA (ARMv8.6 I8MM: Graviton 3, Apple M2, Snapdragon X)
ARM_INT8_FEATURES = ("asimddp", "i8mm")
# Linux arm64 hardware capabilities (arch/arm64/include/uapi/asm/hwcap.h), named as the
# kernel names them in /proc/cpuinfo
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_HWCAP = {"asimd": 1 << 1, "asimddp": 1 << 20, "sve": 1 << 22}
_HWCAP2 = {"sve2": 1 << 1, "i8mm": 1 << 13, "bf16": 1 << 14}
# macOS: sysctl hw.optional.* -> the Linux name
_MACOS = {"hw.optional.AdvSIMD": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
          "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16"}
EMULATED_ENV = "EDGERANK_EMULATED"  # 1 or 0: overrides emulated()
_CPUINFO = Path("/proc/cpuinfo")
_MODALIAS = Path("/sys/devices/system/cpu/modalias")


def default_threads() -> int:
    """Threads a model runs with unless told: one per physical core."""
    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _read_cpuinfo() -> dict[str, str]:
    """The first value of each key in ``/proc/cpuinfo`` (the first CPU's), or nothing."""
    found: dict[str, str] = {}
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return found


def _hwcaps() -> frozenset[str]:
    """ARM features from the Linux auxiliary vector (what the kernel, or qemu-user, reports)."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        caps, caps2 = getauxval(_AT_HWCAP), getauxval(_AT_HWCAP2)
    except (OSError, AttributeError, TypeError):
        return frozenset()
    return frozenset([f for f, bit in _HWCAP.items() if caps & bit] + [f for f, bit in _HWCAP2.items() if caps2 & bit])


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, features): from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``), on
    ARM from the hardware capabilities or sysctl where it has none; the platform's names elsewhere."""
    info = _read_cpuinfo()
    arm = is_arm()
    name = info.get("model name") or info.get("Model name") or ""
    features = frozenset((info.get("Features", "") if arm else info.get("flags", info.get("Features", ""))).split())
    if arm:
        if "flags" in info or "vendor_id" in info:  # an x86 host's cpuinfo seen through qemu-user
            name = f"qemu-user aarch64 on {name or info.get('vendor_id', 'x86')}"
        elif not name and "CPU implementer" in info:
            name = (f"aarch64 implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
                    f" r{info.get('CPU variant', '?')}p{info.get('CPU revision', '?')}")
        if not features and sys.platform == "darwin":
            features = frozenset(f for key, f in _MACOS.items() if _sysctl(key) == "1")
            name = name or _sysctl("machdep.cpu.brand_string")
        elif not features and sys.platform.startswith("linux"):
            features = _hwcaps()
    return name or platform.processor() or platform.machine(), features


def features() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` or ARM ``Features``)."""
    return _cpuinfo()[1]


@functools.cache
def emulated() -> bool:
    """Whether this is an aarch64 Python under user-mode emulation on another CPU (qemu-user
    on x86): ``/proc/cpuinfo`` is an x86 one (qemu-user before 8.1 passes the host's
    through), or sysfs, which no user-mode emulator translates, names an x86 CPU. The
    environment variable ``EDGERANK_EMULATED`` (1 or 0) overrides both."""
    told = os.environ.get(EMULATED_ENV, "").strip()
    if told in ("0", "1"):
        return told == "1"
    if not is_arm():
        return False
    info = _read_cpuinfo()
    if "flags" in info or "vendor_id" in info:
        return True
    try:
        return _MODALIAS.read_text().startswith("cpu:type:x86")
    except OSError:
        return False


def has_bf16() -> bool:
    """Whether bf16 matrix work runs in hardware here (emulated bf16 is slower than fp32)."""
    return any(f in features() for f in BF16_FEATURES)


def has_arm_int8_dot() -> bool:
    """Whether an ARM CPU has int8 dot-product instructions (DotProd or I8MM), which ONNX
    Runtime's int8 kernels (DynamicQuantizeMatMul) use."""
    return any(f in features() for f in ARM_INT8_FEATURES)


@functools.cache
def cpu_id() -> str:
    """The CPU's name and the features that decide compute speed: what a measurement is valid for."""
    name, found = _cpuinfo()
    named = [f for f in (ARM_FEATURES if is_arm() else X86_FEATURES) if f in found]
    return f"{name} [{' '.join(named) or 'no int8 dot-product flags'}]"
