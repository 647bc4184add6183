"""CPU identity on x86 and ARM from a fake /proc/cpuinfo, emulation detection, and the ARM rule
that chooses a compute form where a timing would mislead (docs/platforms.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerank.runtime import compute, cpu

pytestmark = pytest.mark.core

# Graviton 3 (Neoverse V1), as Linux 6.x prints it: no model name; svei8mm/svebf16 are not i8mm/bf16
NEOVERSE_V1 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd
"""
# Raspberry Pi 4 (Cortex-A72): no dot product, no bf16
CORTEX_A72 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
# an x86 host's, as qemu-user before 8.1 shows it to an aarch64 guest
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16
"""


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Set the architecture, /proc/cpuinfo, sysfs's CPU modalias and the auxv hwcaps."""
    monkeypatch.delenv(cpu.EMULATED_ENV, raising=False)

    def set_(arch: str, cpuinfo: str, modalias: str | None = None, hwcaps: frozenset = frozenset()):
        (tmp_path / "cpuinfo").write_text(cpuinfo)
        monkeypatch.setattr(cpu, "_CPUINFO", tmp_path / "cpuinfo")
        monkeypatch.setattr(cpu, "_MODALIAS", tmp_path / "modalias")
        if modalias is not None:
            (tmp_path / "modalias").write_text(modalias)
        monkeypatch.setattr(cpu.platform, "machine", lambda: arch)
        monkeypatch.setattr(cpu.sys, "platform", "linux")
        monkeypatch.setattr(cpu, "_hwcaps", lambda: hwcaps)
        for f in (cpu._cpuinfo, cpu.cpu_id, cpu.emulated):
            f.cache_clear()

    yield set_
    for f in (cpu._cpuinfo, cpu.cpu_id, cpu.emulated):
        f.cache_clear()


def test_arm_features_come_from_the_features_line_and_the_name_from_implementer_and_part(machine):
    machine("aarch64", NEOVERSE_V1, "cpu:type:aarch64:feature:,0000,0001")
    assert {"asimd", "asimddp", "i8mm", "bf16", "sve"} <= cpu.features()
    assert "sve2" not in cpu.features()
    assert cpu.cpu_id() == "aarch64 implementer 0x41 part 0xd40 r0x1p1 [asimd asimddp i8mm bf16 sve]"
    assert cpu.has_bf16() and cpu.has_arm_int8_dot()
    assert not cpu.emulated()  # a real ARM CPU is measured


def test_an_arm_cpu_without_dot_products_or_bf16(machine):
    machine("aarch64", CORTEX_A72)
    assert cpu.cpu_id() == "aarch64 implementer 0x41 part 0xd08 r0x0p3 [asimd]"
    assert not cpu.has_bf16() and not cpu.has_arm_int8_dot()


def test_svebf16_and_svei8mm_alone_are_not_bf16_or_i8mm(machine):
    machine("aarch64", "Features\t: fp asimd svei8mm svebf16\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert not cpu.has_bf16() and not cpu.has_arm_int8_dot()


def test_under_old_qemu_user_an_x86_cpuinfo_means_emulated_and_features_come_from_hwcaps(machine):
    machine("aarch64", ZEN4, "cpu:type:x86,ven0002fam0019", hwcaps=frozenset({"asimd", "asimddp", "i8mm", "bf16"}))
    assert cpu.emulated()
    assert cpu.features() == {"asimd", "asimddp", "i8mm", "bf16"}  # not the host's x86 flags
    assert cpu.cpu_id() == "qemu-user aarch64 on AMD EPYC 9R14 [asimd asimddp i8mm bf16]"


def test_the_hosts_x86_bf16_flags_do_not_count_for_an_emulated_arm_cpu(machine):
    machine("aarch64", ZEN4, hwcaps=frozenset({"asimd"}))
    assert not cpu.has_bf16() and not cpu.has_arm_int8_dot()
    assert cpu.cpu_id().endswith("[asimd]")


def test_under_newer_qemu_user_an_arm_cpuinfo_on_an_x86_sysfs_means_emulated(machine):
    machine("aarch64", NEOVERSE_V1, "cpu:type:x86,ven0002fam0019mod0011:feature:,0000")
    assert cpu.emulated()


def test_the_environment_overrides_emulation_detection(machine, monkeypatch):
    machine("aarch64", ZEN4, hwcaps=frozenset({"asimddp"}))
    monkeypatch.setenv(cpu.EMULATED_ENV, "0")
    cpu.emulated.cache_clear()
    assert not cpu.emulated()
    machine("aarch64", NEOVERSE_V1, "cpu:type:aarch64")
    monkeypatch.setenv(cpu.EMULATED_ENV, "1")
    cpu.emulated.cache_clear()
    assert cpu.emulated()


def test_x86_is_read_as_before_and_never_emulated(machine):
    machine("x86_64", ZEN4, "cpu:type:x86,ven0002")
    assert cpu.cpu_id() == "AMD EPYC 9R14 [avx2 avx512f avx512_vnni avx512_bf16 amx_bf16]"
    assert cpu.has_bf16() and not cpu.emulated()


@pytest.mark.parametrize("hwcaps, usable, form", [
    ({"asimd", "asimddp"}, ["int4", "int8"], "int8"),  # dot products: int8
    ({"asimd", "i8mm"}, ["int4", "int8"], "int8"),
    ({"asimd"}, ["int4", "int8"], "int4"),  # no int8 dot products: int4
    ({"asimd", "asimddp", "i8mm"}, ["int4"], "int4"),  # an int8 form that ranks unlike int4 never runs
])
def test_the_arm_rule(machine, hwcaps, usable, form):
    machine("aarch64", ZEN4, hwcaps=frozenset(hwcaps))
    assert compute.by_rule(usable) == form


def _artifact(int8_fits: bool):
    """An int4 artifact with an int8 form (fitting or not) measured on another CPU."""
    from edgerank.runtime.artifact import Artifact

    return Artifact(Path("unused"), {"quant": {"weights": "int4"}, "layers": ["l0"], "files": {"l0": {"sha256": "0"}},
                                     "compute": {"forms": {"int8": ["l0i8"]}, "fit": {"int8": {"fit": int8_fits}},
                                                 "measured": {"cpu": "x", "ms": {"int4": 1.0, "int8": 0.1}}}},
                    verified=False)


def test_an_emulated_cpu_chooses_by_rule_without_timing_anything(machine, monkeypatch):
    machine("aarch64", ZEN4, hwcaps=frozenset({"asimd", "asimddp"}))
    monkeypatch.setattr(compute, "measure", lambda *a: pytest.fail("an emulated CPU was timed"))
    choice = compute.choose(_artifact(True), threads=2)
    assert (choice.form, choice.how) == ("int8", "rule")
    assert compute.choose(_artifact(True), 2, asked="int4").how == "asked"
    assert compute.choose(_artifact(False), 2).how == "the other forms rank unlike it"
    assert compute.measure_forms(_artifact(True), 2) == {
        "cpu": cpu.cpu_id(), "threads": 2, "probe_tokens": 0, "ms": {}, "fastest": "int8", "how": "rule"}
    assert "bf16" not in compute.runnable(_artifact(True))  # OpenVINO's bf16 is x86's


def test_the_budget_counts_the_embedding_tables_pages_at_the_kernels_page_size(monkeypatch):
    """16 KiB pages (Apple Silicon under Linux) or 64 KiB (some ARM server kernels) hold more of
    the memory-mapped table per row read than x86's 4 KiB."""
    from edgerank.runtime import budget

    shape = budget.Shape(hidden=384, ffn=1536, n_heads=12, n_kv_heads=12, head_dim=32, n_layers=6,
                         layer_bytes=[1 << 20] * 6, head_bytes=1 << 16)
    monkeypatch.setattr(budget, "PAGE_BYTES", 4096)
    small = budget.plan_load(shape, None, None).fixed_mb
    monkeypatch.setattr(budget, "PAGE_BYTES", 65536)
    assert budget.plan_load(shape, None, None).fixed_mb - small == pytest.approx(
        budget.EMBED_READ_ROWS * 2 * (65536 - 4096) / budget.MB)
