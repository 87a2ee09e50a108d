"""The audio translation engine: decode inputs, pick the backend by folder, batch, report metrics.

Backends: a moshi-format Hibiki folder (our Moshi-architecture LM + Mimi), a transformers Whisper
folder (speech -> English text, task="translate") or a SeamlessM4T v2 folder (speech -> text and
speech). A file that cannot be decoded, is empty or too long becomes an ``ItemError``; the rest run.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.audio.backends import Backend, BackendResult, BackendStats, load_transformers_backend
from workers.audio.io import AudioInputError, decode_audio, prepare_waveform
from workers.engine import EngineRun, ItemError, Metric, ProgressFn

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class AudioItem:
    """One input file: raw bytes (wav/flac/ogg/mp3) or a waveform with its rate."""

    name: str
    data: bytes | None = None
    waveform: np.ndarray | None = None
    sample_rate: int | None = None


@dataclass
class Translation:
    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)  # (start_s, end_s, text)
    audio: np.ndarray | None = None  # mono float32 translated speech, if the backend speaks
    sample_rate: int = 0
    input_seconds: float = 0.0


class HibikiBackend:
    name = "hibiki"

    def __init__(self, path: Path, device: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
        from workers.audio.hibiki import HibikiCheckpoint, HibikiTranslator

        mimi_dtype = DTYPES[options.pop("mimi_dtype", "float32")]
        self.ckpt = HibikiCheckpoint.load(
            path, device=device, dtype=dtype, mimi_dtype=mimi_dtype, mimi_path=options.pop("mimi_path", None)
        )
        self.translator = HibikiTranslator(self.ckpt)
        self.input_rate = self.translator.sample_rate
        self.defaults = dict(self.ckpt.gen_defaults)

    def run(
        self,
        wavs: list[np.ndarray],
        params: dict[str, Any],
        stats: BackendStats,
        progress: ProgressFn | None = None,
    ) -> list[BackendResult]:
        from workers.audio.hibiki import HibikiParams, HibikiStats

        p = HibikiParams.from_dict(self.defaults, params)
        hs = HibikiStats()
        outs = self.translator.translate(wavs, p, progress=progress, stats=hs)
        stats.steps += hs.steps
        stats.step_s += hs.step_s
        return [BackendResult(o.text, o.segments, o.audio, o.sample_rate) for o in outs]


def detect_backend(path: str | Path) -> str:
    from workers.audio.hibiki import is_moshi_folder

    path = Path(path)
    if is_moshi_folder(path):
        return "hibiki"
    cfg = path / "config.json"
    if cfg.exists():
        model_type = json.loads(cfg.read_text()).get("model_type")
        if model_type in ("whisper", "seamless_m4t_v2"):
            return model_type
        raise ValueError(f"{path}: unsupported model_type {model_type!r} for audio translation")
    raise ValueError(f"{path}: no config.json, not a model folder")


class AudioEngine:
    kind = "audio"

    def __init__(self, backend: Backend, *, batch_size: int = 8, max_audio_s: float = 300.0) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.max_audio_s = max_audio_s

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", dtype: str = "float32", **options: Any
    ) -> AudioEngine:
        """Options: batch_size (8), max_audio_s (300), threads; Hibiki: mimi_dtype, mimi_path."""
        options = dict(options)
        threads = options.pop("threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        batch_size = int(options.pop("batch_size", 8))
        max_audio_s = float(options.pop("max_audio_s", 300.0))
        kind = detect_backend(path)
        tdtype = DTYPES[dtype]
        backend: Backend
        if kind == "hibiki":
            backend = HibikiBackend(Path(path), device, tdtype, options)
        else:
            backend = load_transformers_backend(kind, Path(path), device, tdtype, options)
        if options:
            log.warning("unused audio engine options: %s", sorted(options))
        return cls(backend, batch_size=batch_size, max_audio_s=max_audio_s)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def _decode(self, item: AudioItem) -> np.ndarray:
        rate = self.backend.input_rate
        if item.data is not None:
            return decode_audio(item.data, rate, max_seconds=self.max_audio_s)
        if item.waveform is not None and item.sample_rate:
            return prepare_waveform(item.waveform, item.sample_rate, rate, max_seconds=self.max_audio_s)
        raise AudioInputError(
            "missing_audio", f"{item.name}: neither bytes nor a waveform with its sample rate"
        )

    def translate(
        self, items: list[AudioItem], params: dict[str, Any] | None = None, progress: ProgressFn | None = None
    ) -> EngineRun:
        params = dict(params or {})
        batch_size = int(params.pop("batch_size", self.batch_size))
        t_start = time.perf_counter()
        outcomes: list[Any] = [None] * len(items)
        wavs: dict[int, np.ndarray] = {}
        for i, item in enumerate(items):
            try:
                wavs[i] = self._decode(item)
            except AudioInputError as exc:
                outcomes[i] = ItemError(exc.code, f"{item.name}: {exc.message}")
                if progress is not None:
                    progress(1)
        rate = self.backend.input_rate
        # similar lengths together: less padding for the transformers backends, fewer idle steps for Hibiki
        order = sorted(wavs, key=lambda i: len(wavs[i]))
        stats = BackendStats()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, res in zip(
                idx, self._run_batch([wavs[i] for i in idx], params, stats, progress), strict=False
            ):
                if isinstance(res, BackendResult):
                    res = Translation(res.text, res.segments, res.audio, res.sample_rate, len(wavs[i]) / rate)
                outcomes[i] = res
        wall = time.perf_counter() - t_start
        audio_s = sum(len(w) / rate for w in wavs.values())
        metrics = [
            Metric("audio_seconds", audio_s, "s"),
            Metric("wall_s", wall, "s"),
            Metric("real_time_factor", wall / audio_s if audio_s else 0.0),
            Metric("ms_per_step", 1000 * stats.step_s / stats.steps if stats.steps else 0.0, "ms"),
            Metric(
                "peak_memory_bytes", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "B"
            ),
        ]
        return EngineRun(outcomes=outcomes, metrics=metrics)

    def _run_batch(
        self, wavs: list[np.ndarray], params: dict[str, Any], stats: BackendStats, progress: ProgressFn | None
    ) -> list[BackendResult | ItemError]:
        reported = 0

        def report(n: int) -> None:
            nonlocal reported
            reported += n
            if progress is not None:
                progress(n)

        try:
            return list(self.backend.run(wavs, params, stats, report))
        except Exception as exc:
            if len(wavs) == 1:
                if reported == 0:
                    report(1)
                if isinstance(exc, (ValueError, TypeError)):  # bad parameters, or input the model refuses
                    return [ItemError("invalid_params", str(exc))]
                log.exception("audio backend failed on one item")
                return [ItemError("engine_error", f"{type(exc).__name__}: {exc}")]
        log.warning("audio batch of %d failed; retrying its items one by one", len(wavs))
        already = reported  # items reported before the failure are not counted twice

        def quiet(n: int) -> None:
            nonlocal already
            skip = min(n, already)
            already -= skip
            if progress is not None and n > skip:
                progress(n - skip)

        out: list[BackendResult | ItemError] = []
        for w in wavs:
            out.extend(self._run_batch([w], params, stats, quiet))
        return out

    def close(self) -> None:
        self.backend = None  # type: ignore[assignment]
