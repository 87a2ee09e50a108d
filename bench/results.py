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


def _cpu() -> str:
    return f"{os.cpu_count()} cores"
