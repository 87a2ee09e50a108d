"""Engines loaded once per worker process and kept warm between chunks and jobs."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from workers.registry import ModelSpec, resolve_model

_lock = threading.Lock()
_engines: dict[tuple, Any] = {}


def _key(spec: ModelSpec, device: str, overrides: dict[str, Any]) -> tuple:
    options = {**spec.options, **overrides}
    return (spec.engine, str(spec.path), device, tuple(sorted((k, repr(v)) for k, v in options.items())))


def load_engine(spec: ModelSpec, device: str, overrides: dict[str, Any] | None = None,
                registry: Path | None = None) -> Any:
    options = {**spec.options, **(overrides or {})}
    if spec.engine == "llm":
        if "offload" in options:  # a FlexLLMGen policy: weights/cache split over device, CPU and disk
            from workers.llm.offload import OffloadedLLMEngine

            return OffloadedLLMEngine.load(spec.path, device=device, **options)
        if "draft_model" in options:  # speculative decoding: a small draft proposes, the target checks
            from workers.llm.speculative import SpeculativeLLMEngine

            draft = str(options["draft_model"])
            if not Path(draft).expanduser().is_dir():  # a registry name, like --model takes
                options["draft_model"] = str(resolve_model(draft, registry).path)
            return SpeculativeLLMEngine.load(spec.path, device=device, **options)
        from workers.llm.engine import LLMEngine

        return LLMEngine.load(spec.path, device=device, **options)
    if spec.engine == "diffusion":
        from workers.diffusion.engine import DiffusionEngine

        return DiffusionEngine.load(spec.path, device=device, **options)
    if spec.engine == "audio":
        from workers.audio.engine import AudioEngine

        return AudioEngine.load(spec.path, device=device, **options)
    raise ValueError(f"model {spec.name!r}: unknown engine {spec.engine!r}")


def get_engine(spec: ModelSpec, device: str, overrides: dict[str, Any] | None = None,
               registry: Path | None = None) -> Any:
    overrides = overrides or {}
    key = _key(spec, device, overrides)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = load_engine(spec, device, overrides, registry)
            _engines[key] = engine
        return engine


def clear() -> None:
    with _lock:
        for engine in _engines.values():
            close = getattr(engine, "close", None)
            if close:
                close()
        _engines.clear()
