"""transformers backends on tiny random local folders: Whisper (translate) and SeamlessM4T v2 (S2TT, S2ST)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.audio.engine import AudioEngine, AudioItem, Translation, detect_backend
from workers.audio.tiny import build_tiny_hibiki, build_tiny_seamless, build_tiny_whisper
from workers.engine import ItemError


def items(*seconds: float, rate: int = 16000) -> list[AudioItem]:
    rng = np.random.default_rng(0)
    return [
        AudioItem(
            f"{s}s", waveform=(rng.normal(size=int(s * rate)) * 0.1).astype(np.float32), sample_rate=rate
        )
        for s in seconds
    ]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return AudioEngine.load(build_tiny_whisper(tmp_path_factory.mktemp("whisper")))


@pytest.fixture(scope="module")
def seamless(tmp_path_factory):
    return AudioEngine.load(build_tiny_seamless(tmp_path_factory.mktemp("seamless")))


def test_detects_backend_from_folder(tmp_path, whisper, seamless) -> None:
    assert whisper.backend_name == "whisper" and seamless.backend_name == "seamless_m4t_v2"
    assert detect_backend(build_tiny_hibiki(tmp_path / "h")) == "hibiki"
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="unsupported"):
        detect_backend(tmp_path / "bert")


def test_whisper_translates_with_timestamps(whisper) -> None:
    run = whisper.translate(items(1.0, 2.5, 33.0), {"source_lang": "fra", "max_new_tokens": 8})
    assert all(isinstance(o, Translation) for o in run.outcomes)
    for o in run.outcomes:
        assert isinstance(o.text, str) and o.audio is None
        assert all(isinstance(s, tuple) and len(s) == 3 and s[0] <= s[1] for s in o.segments)
    assert max(s[1] for s in run.outcomes[2].segments) > 30.0  # long-form: 30 s windows, absolute times
    metrics = {m.name: m.value for m in run.metrics}
    assert metrics["audio_seconds"] == pytest.approx(36.5) and metrics["ms_per_step"] > 0


def test_whisper_short_form_without_timestamps(whisper) -> None:
    (o,) = whisper.translate(items(1.0), {"timestamps": False, "max_new_tokens": 5}).outcomes
    assert isinstance(o, Translation) and o.segments == []


def test_whisper_rejects_non_english_target(whisper) -> None:
    (o,) = whisper.translate(items(1.0), {"target_lang": "fra"}).outcomes
    assert isinstance(o, ItemError) and o.code == "invalid_params"


def test_seamless_speech_to_speech_and_text(seamless) -> None:
    run = seamless.translate(items(1.0, 2.0), {"target_lang": "en", "max_new_tokens": 6})
    for o in run.outcomes:
        assert isinstance(o, Translation) and isinstance(o.text, str)
        assert (
            o.sample_rate == 16000
            and o.audio is not None
            and o.audio.dtype == np.float32
            and len(o.audio) > 0
        )
    (text_only,) = seamless.translate(
        items(1.0), {"target_lang": "fra", "speech": False, "max_new_tokens": 6}
    ).outcomes
    assert isinstance(text_only, Translation) and text_only.audio is None
    (missing,) = seamless.translate(items(1.0), {}).outcomes
    assert isinstance(missing, ItemError) and missing.code == "invalid_params"
