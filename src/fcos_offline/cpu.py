"""What this CPU is: its name and the instruction-set features that decide which builds run fast.

Engine speed on x86 depends on a handful of features: AVX2 (the baseline), AVX-512 with VNNI
(fast int8 dot products), AVX-512 BF16 and AMX tiles (native bf16 and int8 matrix units: on such
CPUs OpenVINO runs bf16 by default and f32 is several times slower). ``tune`` records these in
``tune.json`` and chooses the float precision of int8 builds from them; the benchmarks print them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

#: the features reported (in this order), from /proc/cpuinfo's flags
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_count() -> int:
    """Cores this process may use (affinity-aware: a pinned container's, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """``{"cpu": model name, "cores": usable cores, "features": [...]}`` (``cpuinfo``: the text of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": name, "cores": cpu_count(), "features": [f for f in CPU_FEATURES if f in flags]}


def machine_load() -> dict[str, Any]:
    """The 1-minute load average against the cores this process may use; ``busy`` when it is above them
    (other work then shares the cores, and timings are not a quiet machine's). Read before a run adds its own."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available
        return {"load_avg_1m": None, "cores": cpu_count(), "busy": False}
    return {"load_avg_1m": load, "cores": cpu_count(), "busy": load > cpu_count()}


def describe_cpu(description: dict[str, Any]) -> str:
    """One line: ``AMD EPYC, 2 cores, features: avx2``."""
    features = " ".join(description["features"]) or "none of " + " ".join(CPU_FEATURES)
    return f"{description['cpu']}, {description['cores']} cores, features: {features}"
