"""Audio decoding: formats, mono downmix, resampling, and the per-file errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from workers.audio.io import (
    EMPTY,
    TOO_LONG,
    UNREADABLE,
    AudioInputError,
    decode_audio,
    encode_wav,
    prepare_waveform,
)


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def encode(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt,subtype,rate",
    [
        ("WAV", "PCM_16", 22050),
        ("FLAC", "PCM_16", 16000),
        ("OGG", "VORBIS", 24000),
        ("OGG", "OPUS", 48000),
        ("MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_formats_decode_to_target_rate(fmt: str, subtype: str, rate: int) -> None:
    data = encode(tone(1.0, rate), rate, fmt, subtype)
    wav = decode_audio(data, 24000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 24000) < 24000 * 0.06  # codecs add a little priming/padding
    assert 0.1 < np.abs(wav).max() < 0.5


def test_stereo_is_downmixed_and_resampled() -> None:
    left = tone(0.5, 48000)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # the mean of the two channels: half amplitude
    wav = decode_audio(encode(stereo, 48000, "WAV", "FLOAT"), 16000)
    assert wav.shape == (8000,)
    np.testing.assert_allclose(np.abs(wav).max(), 0.15, atol=0.01)


def test_errors_have_codes() -> None:
    with pytest.raises(AudioInputError) as e:
        decode_audio(b"", 24000)
    assert e.value.code == EMPTY
    with pytest.raises(AudioInputError) as e:
        decode_audio(b"this is not audio at all" * 10, 24000)
    assert e.value.code == UNREADABLE
    with pytest.raises(AudioInputError) as e:
        decode_audio(encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"), 24000)
    assert e.value.code == EMPTY
    with pytest.raises(AudioInputError) as e:
        decode_audio(encode(tone(3.0, 8000), 8000, "WAV", "PCM_16"), 24000, max_seconds=2.0)
    assert e.value.code == TOO_LONG
    with pytest.raises(AudioInputError) as e:
        prepare_waveform(np.array([0.0, np.nan], np.float32), 16000, 16000)
    assert e.value.code == UNREADABLE


def test_wav_roundtrip_clips() -> None:
    x = np.array([0.0, 0.5, -0.5, 2.0, -2.0], np.float32)
    y, rate = sf.read(io.BytesIO(encode_wav(x, 24000)), dtype="float32")
    assert rate == 24000
    np.testing.assert_allclose(y, [0.0, 0.5, -0.5, 1.0, -1.0], atol=1e-4)
