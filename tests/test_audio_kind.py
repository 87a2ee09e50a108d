"""The "audio" job kind: parameters, input parsing, and a whole job through the embedded flow."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from tasks.kinds.audio import AudioKind
from tasks.kinds.base import JobInvalid
from workers.audio.tiny import build_tiny_hibiki

KIND = AudioKind()
HIBIKI_CFG = {"n_q": 4, "dep_q": 2, "conditioners": {"description": {}}}


def test_params_checked_and_normalised() -> None:
    out = KIND.validate_params(
        {"cfg_coef": 3, "temp": 0.5, "source_lang": " fr ", "timestamps": False}, HIBIKI_CFG
    )
    assert out == {"cfg_coef": 3, "temp": 0.5, "source_lang": "fr", "timestamps": False, "seed": 42}
    for bad, match in [
        ({"bogus": 1}, "bogus"),
        ({"top_k": 1.5}, "top_k"),
        ({"temp": -1}, "temp"),
        ({"speech": "yes"}, "speech"),
        ({"target_lang": ""}, "target_lang"),
    ]:
        with pytest.raises(JobInvalid, match=match):
            KIND.validate_params(bad, HIBIKI_CFG)
    with pytest.raises(JobInvalid, match="target_lang"):
        KIND.validate_params({}, {"model_type": "seamless_m4t_v2"})
    with pytest.raises(JobInvalid, match="English"):
        KIND.validate_params({"target_lang": "de"}, {"model_type": "whisper"})
    with pytest.raises(JobInvalid, match="cfg_coef"):
        KIND.validate_params({"cfg_coef": 2.0}, {"n_q": 4, "dep_q": 2})


def test_parse_text_and_jsonl_lists() -> None:
    data = (
        b'uploads/a.wav\n\n{"key": "uploads/b.mp3", "custom_id": "b"}\n'
        b'"uploads/c.flac"\n{"key": 3}\n{broken\n'
    )
    parsed = KIND.parse(data, {})
    assert [(r["index"], r["line"], r["input"], r["custom_id"]) for r in parsed.requests] == [
        (0, 1, "uploads/a.wav", None),
        (1, 3, "uploads/b.mp3", "b"),
        (2, 4, "uploads/c.flac", None),
    ]
    assert [(e["line"], e["error"]["code"]) for e in parsed.errors] == [
        (5, "missing_key"),
        (6, "invalid_json"),
    ]
    with pytest.raises(JobInvalid):
        KIND.parse(b"\n  \n", {})


def wav_bytes(seconds: float, rate: int = 22050, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def test_audio_job_end_to_end(tmp_path) -> None:
    from tasks.embedded import run_job
    from tasks.flow import open_services
    from tasks.settings import Settings

    svc = open_services(Settings(home=tmp_path / "home", chunk_size=2, max_attempts=2), migrate=True)
    folder = build_tiny_hibiki(tmp_path / "hibiki")
    svc.bucket.put_bytes("uploads/local/one.wav", wav_bytes(0.6))
    svc.bucket.put_bytes("uploads/local/two.flac", wav_bytes(1.1, 16000, "FLAC"))
    svc.bucket.put_bytes("uploads/local/junk.ogg", b"OggS but not really" * 20)
    svc.bucket.put_bytes("uploads/local/three.wav", wav_bytes(0.3, 44100))
    listing = (
        'uploads/local/one.wav\nuploads/local/missing.wav\n{"key": "uploads/local/two.flac", "custom_id": "t"}\n'
        "uploads/local/junk.ogg\n{oops\nuploads/local/three.wav"
    )
    job = run_job(
        svc,
        model=str(folder),
        kind="audio",
        input_bytes=listing.encode(),
        params={"seed": 3, "max_tail_s": 0.5, "cfg_coef": 2.0},
        show_progress=False,
    )
    assert job.state == "completed", job.error_message
    assert (job.total, job.completed, job.failed) == (6, 3, 3)

    def read(key: str) -> list[dict]:
        return [json.loads(x) for x in svc.bucket.get_bytes(key).splitlines() if x.strip()]

    out = read(job.output_key)
    assert [o["input"] for o in out] == ["uploads/local/one.wav", "uploads/local/two.flac", "uploads/local/three.wav"]
    for o in out:
        assert set(o) >= {"index", "input", "text", "segments", "audio_key"}
        audio, rate = sf.read(io.BytesIO(svc.bucket.get_bytes(o["audio_key"])))
        assert rate == 24000 and len(audio) % 1920 == 0 and len(audio) > 0
    assert out[1]["custom_id"] == "t" and out[1]["audio_key"].endswith("/outputs/00002.wav")
    errors = read(job.error_key)
    assert [(e["line"], e["error"]["code"]) for e in errors] == [
        (2, "audio_not_found"),
        (4, "unreadable_audio"),
        (5, "invalid_json"),
    ]
    index = read(f"jobs/{job.id}/outputs/index.jsonl")
    assert [(e["line"], e["status"]) for e in index] == [
        (1, "ok"),
        (2, "error"),
        (3, "ok"),
        (4, "error"),
        (5, "error"),
        (6, "ok"),
    ]
    assert index[0]["audio_key"] == out[0]["audio_key"] and index[1]["error"]["code"] == "audio_not_found"


def test_an_audio_list_may_name_only_the_owners_uploads():
    from tasks.kinds.audio import AudioKind

    data = "\n".join(["uploads/alice/a.wav", "uploads/bob/b.wav", "../../etc/passwd",
                      '{"key": "uploads/alice/c.wav", "custom_id": "c"}', "/abs/path.wav"]).encode()
    parsed = AudioKind().parse(data, {"_owner": "alice"})
    assert [r["input"] for r in parsed.requests] == ["uploads/alice/a.wav", "uploads/alice/c.wav"]
    assert [r["index"] for r in parsed.requests] == [0, 1]
    codes = {e["line"]: e["error"]["code"] for e in parsed.errors}
    assert codes == {2: "forbidden_key", 3: "invalid_key", 5: "invalid_key"}
