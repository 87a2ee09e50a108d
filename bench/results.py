"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the benchmark named in it; ratios compare against a baseline run in the same process run.\n"


def write_section(title: str, body: str, script: str | None = None) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = f"_{dt.date.today().isoformat()}, {platform.machine()}, {_cpu()}_"
    section = f"## {title}\n\n{stamp}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def per_cpu(title: str) -> str:
    """E.g. "LLM batch throughput, AVX2 CPU": for figures whose ratios depend on the CPU's matmul
    unit, so that a run on one kind of CPU leaves another kind's section in place."""
    unit = matmul_unit()
    return title if unit is None else f"{title}, {unit} CPU"


def matmul_unit() -> str | None:
    """The CPU's strongest matmul unit ("AMX", "AVX-512 bf16", "AVX-512", "AVX2"), None if unknown:
    throughput figures from CPUs of different units belong in sections of their own."""
    flags = set(_cpu_info().get("flags", "").split())
    for name, flag in (
        ("AMX", "amx_tile"),
        ("AVX-512 bf16", "avx512_bf16"),
        ("AVX-512", "avx512f"),
        ("AVX2", "avx2"),
    ):
        if flag in flags:
            return name
    return None


def _cpu_info() -> dict[str, str]:
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not line.strip():
                break  # the first processor's block is enough
            info.setdefault(key.strip(), value.strip())
    return info


def _cpu() -> str:
    """E.g. "AMD EPYC (family 25, model 17; AVX-512 bf16), 2 cores": matmul and memory throughput
    differ between CPU generations far more than between runs, so figures name their CPU."""
    info = _cpu_info()
    if "model name" not in info:
        return f"{os.cpu_count()} cores"
    detail = f"family {info.get('cpu family', '?')}, model {info.get('model', '?')}"
    unit = matmul_unit()
    if unit is not None:
        detail += f"; {unit}"
    return f"{info['model name']} ({detail}), {os.cpu_count()} cores"
