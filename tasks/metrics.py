"""Job-level metrics from chunk metrics: counts add up, peaks take the max, rates are recomputed."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

# rate = numerator / wall-clock seconds over the job, when the job has both
JOB_RATES = {"tokens_per_s": "generated_tokens", "samples_per_s": "samples", "audio_seconds_per_s": "audio_seconds"}
MAX_NAMES = ("peak_memory_bytes", "model_bytes")


def aggregate_job_metrics(rows: Iterable[Any], started_at: datetime | None) -> list[tuple[str, float, str]]:
    by_name: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in rows:
        if r.chunk_index is not None:
            by_name[r.name].append((float(r.value), r.unit))
    out: dict[str, tuple[float, str]] = {}
    for name, values in by_name.items():
        unit = values[0][1]
        nums = [v for v, _ in values]
        if name.startswith("peak_") or name in MAX_NAMES:
            out[name] = (max(nums), unit)
        elif name.endswith("_per_s") or name in ("real_time_factor", "ms_per_step", "acceptance_rate") or unit in ("ratio", "1"):
            out[name] = (sum(nums) / len(nums), unit)  # mean over chunks
        else:
            out[name] = (sum(nums), unit)
    if started_at is not None:
        wall = max((datetime.now(UTC) - started_at).total_seconds(), 1e-9)
        out["job_wall_s"] = (wall, "s")
        for rate, numerator in JOB_RATES.items():
            if numerator in out:
                out[f"job_{rate}"] = (out[numerator][0] / wall, out[numerator][1] + "/s")
    return [(name, value, unit) for name, (value, unit) in sorted(out.items())]
