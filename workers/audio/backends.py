"""transformers speech-translation backends: Whisper (task="translate", to English text) and
SeamlessM4T v2 (speech to text, and speech to speech), loaded from local folders.

A backend takes mono float32 waveforms at its ``input_rate`` and returns one `BackendResult` each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

ProgressFn = Callable[[int], None]

# ISO 639-1 -> 639-3 for the languages callers most often name; 3-letter codes pass through
ISO3 = {
    "en": "eng",
    "fr": "fra",
    "de": "deu",
    "es": "spa",
    "it": "ita",
    "pt": "por",
    "nl": "nld",
    "ru": "rus",
    "zh": "cmn",
    "ja": "jpn",
    "ko": "kor",
    "ar": "arb",
    "hi": "hin",
    "tr": "tur",
    "pl": "pol",
    "uk": "ukr",
    "sv": "swe",
    "cs": "ces",
    "ro": "ron",
    "fi": "fin",
    "da": "dan",
    "vi": "vie",
    "id": "ind",
    "ca": "cat",
}
ISO1 = {v: k for k, v in ISO3.items()}
ENGLISH = {"en", "eng", "english"}


@dataclass
class BackendResult:
    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    audio: np.ndarray | None = None
    sample_rate: int = 0


@dataclass
class BackendStats:
    steps: int = 0  # decoding steps (LM frames for Hibiki, generated tokens for seq2seq models)
    step_s: float = 0.0


class Backend(Protocol):
    name: str
    input_rate: int

    def run(
        self,
        wavs: list[np.ndarray],
        params: dict[str, Any],
        stats: BackendStats,
        progress: ProgressFn | None = None,
    ) -> list[BackendResult]: ...


def _gen_kwargs(params: dict[str, Any], default_tokens: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": int(params.get("max_new_tokens") or default_tokens)}
    if params.get("num_beams"):
        kw["num_beams"] = int(params["num_beams"])
    if params.get("temperature"):
        kw.update(do_sample=True, temperature=float(params["temperature"]))
    return kw


class WhisperBackend:
    name = "whisper"

    def __init__(self, path: Path, device: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.input_rate: int = self.processor.feature_extractor.sampling_rate
        self.chunk_s = self.processor.feature_extractor.chunk_length  # 30 s windows

    def run(
        self,
        wavs: list[np.ndarray],
        params: dict[str, Any],
        stats: BackendStats,
        progress: ProgressFn | None = None,
    ) -> list[BackendResult]:
        target = params.get("target_lang")
        if target and str(target).lower() not in ENGLISH:
            raise ValueError(f"Whisper translates to English only, got target_lang={target!r}")
        src = params.get("source_lang")
        src = ISO1.get(src, src) if src else None  # Whisper names languages by 2-letter code
        timestamps = bool(params.get("timestamps", True))
        long_form = any(len(w) > self.chunk_s * self.input_rate for w in wavs)
        feats = self.processor.feature_extractor(
            wavs,
            sampling_rate=self.input_rate,
            return_tensors="pt",
            return_attention_mask=True,
            **({"truncation": False, "padding": "longest"} if long_form else {}),
        )
        model = self.model
        inputs = feats["input_features"].to(model.device, model.dtype)
        mask = feats["attention_mask"].to(model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seqs = model.generate(
                inputs,
                attention_mask=mask,
                task="translate",
                language=src,
                return_timestamps=timestamps or long_form,
                **_gen_kwargs(params, 128),
            )
        if not isinstance(seqs, torch.Tensor):
            seqs = seqs["sequences"] if isinstance(seqs, dict) else seqs.sequences
        stats.step_s += time.perf_counter() - t0
        stats.steps += int(seqs.shape[-1])
        tok = self.processor.tokenizer
        results = []
        for row in seqs:
            ids = row.tolist()
            text = tok.decode(ids, skip_special_tokens=True).strip()
            segments: list[tuple[float, float, str]] = []
            if timestamps or long_form:
                decoded = tok.decode(ids, skip_special_tokens=True, output_offsets=True)
                for off in decoded.get("offsets", []):
                    start, end = off["timestamp"]
                    segments.append(
                        (float(start), float(end if end is not None else start), off["text"].strip())
                    )
            results.append(BackendResult(text, segments, None, 0))
        if progress is not None:
            progress(len(wavs))
        return results


class SeamlessBackend:
    name = "seamless_m4t_v2"

    def __init__(self, path: Path, device: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
        from transformers import AutoProcessor, SeamlessM4Tv2Model

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = SeamlessM4Tv2Model.from_pretrained(path, dtype=dtype).to(device).eval()
        self.input_rate: int = self.processor.feature_extractor.sampling_rate
        self.output_rate: int = self.model.config.sampling_rate
        self.speech_default = bool(options.pop("speech", True))

    def run(
        self,
        wavs: list[np.ndarray],
        params: dict[str, Any],
        stats: BackendStats,
        progress: ProgressFn | None = None,
    ) -> list[BackendResult]:
        target = params.get("target_lang")
        if not target:
            raise ValueError("SeamlessM4T needs target_lang (e.g. 'eng')")
        tgt = ISO3.get(str(target).lower(), str(target).lower())
        speech = bool(params.get("speech", self.speech_default))
        feats = self.processor(audio=wavs, sampling_rate=self.input_rate, return_tensors="pt", padding=True)
        model = self.model
        kwargs: dict[str, Any] = {
            "input_features": feats["input_features"].to(model.device, model.dtype),
            "attention_mask": feats["attention_mask"].to(model.device),
            "tgt_lang": tgt,
            "generate_speech": speech,
            **{("text_" + k): v for k, v in _gen_kwargs(params, 256).items()},
        }
        if speech:
            kwargs.update(return_intermediate_token_ids=True, speaker_id=int(params.get("speaker_id", 0)))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kwargs)
        stats.step_s += time.perf_counter() - t0
        seqs = out.sequences if speech else (out[0] if isinstance(out, tuple) else out.sequences)
        stats.steps += int(seqs.shape[-1])
        texts = self.processor.batch_decode(seqs, skip_special_tokens=True)
        lengths = None
        if speech and out.waveform_lengths is not None:
            lengths = out.waveform_lengths.reshape(-1).tolist()  # 0-d for a batch of one
        results = []
        for i, text in enumerate(texts):
            audio = None
            if speech:
                n = int(lengths[i]) if lengths is not None else out.waveform.shape[-1]
                audio = out.waveform[i, :n].float().cpu().numpy()
            results.append(BackendResult(text.strip(), [], audio, self.output_rate if speech else 0))
        if progress is not None:
            progress(len(wavs))
        return results


def load_transformers_backend(
    kind: str, path: Path, device: str, dtype: torch.dtype, options: dict[str, Any]
) -> Backend:
    if kind == "whisper":
        return WhisperBackend(path, device, dtype, options)
    if kind == "seamless_m4t_v2":
        return SeamlessBackend(path, device, dtype, options)
    raise ValueError(f"unknown backend {kind!r}")
