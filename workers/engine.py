"""The contract every engine keeps: plain objects in, plain objects out.

Engines import nothing from Celery, SQL or the bucket. A job kind (``tasks/kinds``) turns its
parsed requests into an engine's own request type, calls the engine, and writes what comes back.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# called with the number of items (or steps) finished since the last call
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""


@dataclass
class EngineRun:
    """What one engine call returns: one outcome per request, in request order, plus metrics."""

    outcomes: list  # engine-specific result objects, or ItemError for a failed item
    metrics: list[Metric] = field(default_factory=list)


@dataclass(frozen=True)
class ItemError:
    """One request the engine could not serve; the other requests of the call still complete."""

    code: str  # short machine-readable reason, e.g. "prompt_too_long"
    message: str


class Engine(Protocol):
    """Built once per worker and model (``workers.model_cache``), then reused for every chunk."""

    kind: str  # "llm" | "diffusion" | "audio"

    def close(self) -> None: ...
