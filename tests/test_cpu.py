"""The CPU description tune records and the benchmarks print."""

from __future__ import annotations

from fcos_offline.cpu import cpu_description, describe_cpu

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
EPYC_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx f16c avx2 bmi2 vaes vpclmulqdq
"""


def test_features_are_read_from_cpuinfo() -> None:
    xeon = cpu_description(XEON_AMX)
    assert xeon["cpu"] == "Intel(R) Xeon(R) Platinum 8488C"
    assert xeon["features"] == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]
    epyc = cpu_description(EPYC_AVX2)
    assert epyc["cpu"] == "AMD EPYC 7B13" and epyc["features"] == ["avx2"]
    assert describe_cpu(epyc).startswith("AMD EPYC 7B13, ") and describe_cpu(epyc).endswith("features: avx2")
    assert "none of avx2" in describe_cpu(cpu_description("model name : Foo\nflags : sse2\n"))


def test_this_machine_is_described() -> None:
    here = cpu_description()
    assert here["cpu"] and here["cores"] >= 1 and set(here["features"]) <= {*XEON_AMX.split(), "avx_vnni"}


def test_cores_are_the_ones_this_process_may_use(monkeypatch) -> None:
    """A container pinned to 2 of a host's 64 cores has 2: thread sweeps, decode pools and reports use that."""
    import os

    from fcos_offline.cpu import cpu_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu_count() == 2 and cpu_description("")["cores"] == 2
