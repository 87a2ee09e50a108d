"""Hibiki-style batch translation on a tiny random moshi-format folder, and the audio engine around it."""

from __future__ import annotations

import io
import math
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf
import torch

from workers.audio.engine import AudioEngine, AudioItem, Translation
from workers.audio.hibiki import HibikiCheckpoint, HibikiParams, HibikiTranslator
from workers.audio.tiny import build_tiny_hibiki
from workers.engine import ItemError

SR = 24000
FRAME = 1920


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_hibiki(tmp_path_factory.mktemp("hibiki"))


@pytest.fixture(scope="module")
def translator(folder):
    return HibikiTranslator(HibikiCheckpoint.load(folder))


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=int(seconds * SR)) * 0.1).astype(np.float32)


@contextmanager
def scripted_text(translator: HibikiTranslator, script):
    """Force the text logits: ``script(step, vocab) -> logits row`` (all rows alike)."""
    state = {"step": 0}

    def hook(module, args, out):
        row = script(state["step"], out.shape[-1]).to(out)
        state["step"] += 1
        return row.expand_as(out).clone()

    handle = translator.lm.text_linear.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def one_hot(index: int, size: int) -> torch.Tensor:
    x = torch.full((size,), -1e4)
    x[index] = 1e4
    return x


def test_each_row_stops_at_its_eos_after_input(translator) -> None:
    eos = translator.sp.eos_id()
    md = translator.lm.cfg.max_delay
    wavs = [noise(1.0), noise(2.0, 1), noise(3.3, 2)]
    with scripted_text(translator, lambda step, v: one_hot(eos, v)):  # EOS from the very first step
        outs = translator.translate(wavs, HibikiParams(seed=0, max_tail_s=2))
    for wav, out in zip(wavs, outs, strict=False):
        n = math.ceil(len(wav) / FRAME)
        eos_step = n + 1  # the first frame is fed twice, then n frames, then the EOS frame
        assert out.finished
        assert out.frames == eos_step - md + 1  # early EOS ignored; the first counted one stops the row
        assert out.audio.shape == (out.frames * FRAME,) and out.audio.dtype == np.float32
        assert out.sample_rate == SR and out.text == "" and out.segments == []


def test_row_without_eos_stops_at_the_cap(translator) -> None:
    eos = translator.sp.eos_id()

    def never_eos(step: int, v: int) -> torch.Tensor:
        x = torch.zeros(v)
        x[eos] = -1e4
        return x

    with scripted_text(translator, never_eos):
        (out,) = translator.translate([noise(1.0)], HibikiParams(seed=0, max_tail_s=0.8))
    n, tail = math.ceil(SR / FRAME), math.ceil(0.8 * 12.5)
    steps = 1 + n + 1 + tail
    assert not out.finished
    assert out.frames == steps - translator.lm.cfg.max_delay
    assert len(out.audio) == out.frames * FRAME


def test_text_tokens_and_timestamps(translator) -> None:
    sp = translator.sp
    the, we, pad, eos = sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581we"), 3, sp.eos_id()
    n = math.ceil(SR * 0.5 / FRAME)
    script = {3: the, 4: we, 5: sp.piece_to_id("a"), n + 2: eos}
    with scripted_text(translator, lambda step, v: one_hot(script.get(step, pad), v)):
        (out,) = translator.translate([noise(0.5)], HibikiParams(seed=0, temp_text=0))
    assert out.finished and out.text == "the wea"
    frame_s = 1 / 12.5
    # output frame f carries the text sampled at step f (text delay 0; audio streams lag by their delay):
    # timestamps are frame * 80 ms
    assert out.tokens == [(3, the), (4, we), (5, sp.piece_to_id("a"))]
    assert out.segments == [
        (pytest.approx(3 * frame_s), pytest.approx(4 * frame_s), "the"),
        (pytest.approx(4 * frame_s), pytest.approx(6 * frame_s), "wea"),
    ]


def test_batch_of_mixed_lengths_matches_single_runs(translator) -> None:
    """Per-row EOS tracking + pruning: an item's greedy output does not depend on its batch mates."""
    p = HibikiParams(temp=0, temp_text=0, max_tail_s=1.0, cfg_coef=2.0)
    wavs = [noise(0.4, 3), noise(1.2, 4), noise(0.8, 5)]
    together = translator.translate(wavs, p)
    for wav, out in zip(wavs, together, strict=False):
        (alone,) = translator.translate([wav], p)
        assert alone.tokens == out.tokens and alone.frames == out.frames
        np.testing.assert_allclose(alone.audio, out.audio, atol=1e-4)


def test_cfg_doubles_the_lm_batch(translator) -> None:
    rows = []
    handle = translator.lm.text_linear.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        translator.translate([noise(0.3), noise(0.3, 1)], HibikiParams(seed=0, max_tail_s=0.2, cfg_coef=3.0))
        first_cfg = rows[0]
        rows.clear()
        translator.translate([noise(0.3), noise(0.3, 1)], HibikiParams(seed=0, max_tail_s=0.2))
    finally:
        handle.remove()
    assert first_cfg == 4 and rows[0] == 2


def test_seeded_translation_is_deterministic(translator) -> None:
    wavs = [noise(0.6, 7), noise(0.9, 8)]
    p = HibikiParams(seed=11, max_tail_s=1.0, cfg_coef=1.5)
    a, b = translator.translate(wavs, p), translator.translate(wavs, p)
    c = translator.translate(wavs, HibikiParams(seed=12, max_tail_s=1.0, cfg_coef=1.5))
    for x, y in zip(a, b, strict=False):
        assert x.tokens == y.tokens and x.frames == y.frames
        np.testing.assert_array_equal(x.audio, y.audio)
    assert any(
        x.frames != z.frames or not np.array_equal(x.audio, z.audio) for x, z in zip(a, c, strict=False)
    )


def wav_bytes(x: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt)
    return buf.getvalue()


def test_engine_bad_files_fail_only_their_item(folder) -> None:
    engine = AudioEngine.load(folder, max_audio_s=3.0)
    assert engine.backend_name == "hibiki" and engine.kind == "audio"
    good = (np.sin(np.arange(16000) / 10) * 0.2).astype(np.float32)
    items = [
        AudioItem("good.wav", data=wav_bytes(good)),
        AudioItem("empty.wav", data=b""),
        AudioItem("junk.mp3", data=b"ID3 not really an mp3" * 50),
        AudioItem("long.flac", data=wav_bytes(np.zeros(16000 * 4, np.float32), fmt="FLAC")),
        AudioItem("array", waveform=good, sample_rate=16000),
    ]
    done = []
    run = engine.translate(items, {"seed": 0, "max_tail_s": 0.5}, progress=done.append)
    ok, empty, junk, long, arr = run.outcomes
    assert isinstance(ok, Translation) and isinstance(arr, Translation)
    assert ok.sample_rate == SR and ok.audio is not None and ok.input_seconds == pytest.approx(1.0)
    assert isinstance(ok.text, str) and all(len(s) == 3 for s in ok.segments)
    assert (empty.code, junk.code, long.code) == ("empty_audio", "unreadable_audio", "audio_too_long")
    assert all(isinstance(e, ItemError) and e.message for e in (empty, junk, long))
    assert sum(done) == len(items)
    metrics = {m.name: m.value for m in run.metrics}
    assert metrics["audio_seconds"] == pytest.approx(2.0)
    assert metrics["real_time_factor"] > 0 and metrics["ms_per_step"] > 0
    assert metrics["peak_memory_bytes"] > 1e6 and metrics["wall_s"] > 0
    bad = engine.translate(
        [AudioItem("good.wav", data=wav_bytes(good))], {"cfg_coef": 2.0, "condition": "superb"}
    )
    assert isinstance(bad.outcomes[0], ItemError) and bad.outcomes[0].code == "invalid_params"


def test_preconverted_mimi_folder_loads_the_same(folder, translator, tmp_path) -> None:
    """`genmill convert-mimi` output (convert_mimi) placed next to the checkpoint is used as is."""
    import json

    from workers.audio.mimi_convert import convert_mimi

    raw = json.loads((folder / "mimi_config.json").read_text())
    converted = convert_mimi(folder / "mimi.safetensors", tmp_path / "mimi", {"moshi_config": raw})
    ckpt = HibikiCheckpoint.load(folder, mimi_path=converted)
    wav = noise(0.7, 9)
    a = ckpt.codec.encode([wav], 2, [9])[0]
    b = translator.codec.encode([wav], 2, [9])[0]
    assert torch.equal(a, b)
