"""Audio in and out: decode wav/flac/ogg(vorbis, opus)/mp3 to mono float32 at a model's rate; encode WAV.

soundfile (libsndfile >= 1.1, bundled in its wheels) reads every input format, mp3 included; soxr
resamples. Failures are `AudioInputError` with a short code so a job can fail only that file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# codes carried by AudioInputError (and by the engine's ItemError for that file)
UNREADABLE = "unreadable_audio"
EMPTY = "empty_audio"
TOO_LONG = "audio_too_long"


class AudioInputError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _open(source: bytes | str | Path) -> sf.SoundFile:
    raw: io.BytesIO | str = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        return sf.SoundFile(raw)
    except Exception as exc:  # libsndfile raises LibsndfileError / RuntimeError / TypeError by format
        raise AudioInputError(UNREADABLE, f"cannot decode audio: {exc}") from exc


def decode_audio(
    source: bytes | str | Path,
    target_rate: int,
    *,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode to mono float32 at ``target_rate``. Checks the length from the header before decoding."""
    if isinstance(source, (bytes, bytearray)) and len(source) == 0:
        raise AudioInputError(EMPTY, "audio file is empty (0 bytes)")
    with _open(source) as f:
        rate = f.samplerate
        frames = f.frames
        if max_seconds is not None and frames > 0 and frames / rate > max_seconds:
            raise AudioInputError(
                TOO_LONG, f"audio is {frames / rate:.1f} s long, the limit is {max_seconds:.0f} s"
            )
        try:
            data = f.read(dtype="float32", always_2d=True)
        except Exception as exc:
            raise AudioInputError(UNREADABLE, f"cannot decode audio: {exc}") from exc
    if data.shape[0] == 0:
        raise AudioInputError(EMPTY, "audio has no samples")
    # some headers (streamed mp3/ogg) under-report the length: check again after decoding
    if max_seconds is not None and data.shape[0] / rate > max_seconds:
        raise AudioInputError(
            TOO_LONG, f"audio is {data.shape[0] / rate:.1f} s long, the limit is {max_seconds:.0f} s"
        )
    if not np.isfinite(data).all():
        raise AudioInputError(UNREADABLE, "audio contains NaN or infinite samples")
    return resample(to_mono(data), rate, target_rate)


def to_mono(data: np.ndarray) -> np.ndarray:
    """[frames, channels] or [frames] -> [frames]; channels are averaged."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    return data.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if src_rate == dst_rate:
        return wav
    return soxr.resample(wav, src_rate, dst_rate, quality="HQ").astype(np.float32, copy=False)


def prepare_waveform(
    wav: np.ndarray, sample_rate: int, target_rate: int, *, max_seconds: float | None = None
) -> np.ndarray:
    """The same checks and conversions as `decode_audio`, for a waveform already in memory."""
    arr = np.asarray(wav, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] < arr.shape[1] and arr.shape[0] <= 8:
        arr = arr.T  # [channels, frames] given: make it [frames, channels]
    if arr.size == 0:
        raise AudioInputError(EMPTY, "audio has no samples")
    if max_seconds is not None and arr.shape[0] / sample_rate > max_seconds:
        raise AudioInputError(
            TOO_LONG, f"audio is {arr.shape[0] / sample_rate:.1f} s long, the limit is {max_seconds:.0f} s"
        )
    if not np.isfinite(arr).all():
        raise AudioInputError(UNREADABLE, "audio contains NaN or infinite samples")
    return resample(to_mono(arr), sample_rate, target_rate)


def encode_wav(wav: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """Mono WAV bytes; float input is clipped to [-1, 1] first so 16-bit PCM cannot wrap around."""
    arr = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, arr, sample_rate, format="WAV", subtype=subtype)
    return buf.getvalue()
