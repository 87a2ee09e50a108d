"""The "audio" job kind: translate a list of audio files stored in the bucket.

Input file: one bucket key a line (plain text), or JSONL whose lines are a key string or an object
``{"key": ..., "custom_id": ...}``; blank lines are skipped. One request per audio file. A chunk reads
each object, runs the audio engine, writes the translated speech to ``outputs/{index:05d}.wav`` and
returns ``{"index", "line", "input", "text", "segments", "audio_key"}`` lines; an unreadable, empty,
missing or over-long file becomes an error entry and the rest of the chunk completes. Finalize writes
``outputs/index.jsonl``: one line per input, in input order, linking it to its outputs or its error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from storage.bucket import BucketKeyError, safe_key
from tasks.kinds.base import ChunkContext, ChunkResult, FinalizeContext, JobInvalid, ParsedInput
from workers.engine import ItemError

# parameter -> (type(s), low, high); None bounds are open
_NUMBERS: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "temp": ((int, float), 0, 5),
    "temp_text": ((int, float), 0, 5),
    "top_k": ((int,), 0, None),
    "top_k_text": ((int,), 0, None),
    "cfg_coef": ((int, float), 0, 20),
    "seed": ((int,), 0, 2**63 - 1),
    "max_tail_s": ((int, float), 0, 600),
    "max_new_tokens": ((int,), 1, 4096),
    "num_beams": ((int,), 1, 16),
    "speaker_id": ((int,), 0, None),
    "batch_size": ((int,), 1, 256),
    "temperature": ((int, float), 0, 5),
}
_STRINGS = {"source_lang", "target_lang", "condition"}
_FLAGS = {"timestamps", "speech"}
_ENGLISH = {"en", "eng", "english"}


def _backend(model_config: dict[str, Any]) -> str | None:
    if "dep_q" in model_config and "n_q" in model_config:
        return "hibiki"
    return model_config.get("model_type")


def _error(req: dict[str, Any], code: str, message: str, status: int = 400) -> dict[str, Any]:
    line = req.get("line")
    return {
        "index": req.get("index"),
        "line": line,
        "input": req.get("input"),
        "custom_id": req.get("custom_id"),
        "response": {"status_code": status, "body": {"error": {"code": code, "message": message}}},
        "error": {"code": code, "message": f"line {line}: {message}"},
    }


def _chunk_seed(seed: int, first_index: int) -> int:
    # a redelivered chunk draws the same numbers; different chunks draw different ones
    digest = hashlib.blake2b(f"{seed}:{first_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _key_problem(key: str, owner: str | None) -> tuple[str, str] | None:
    """An input may name only objects inside the bucket that its owner uploaded."""
    try:
        safe_key(key)
    except BucketKeyError as exc:
        return "invalid_key", str(exc)
    if owner is not None and not key.startswith(f"uploads/{owner}/"):
        return "forbidden_key", f"{key!r} is not one of your uploads (expected uploads/{owner}/...)"
    return None


class AudioKind:
    name = "audio"
    engine = "audio"
    needs_input_file = True

    def validate_params(self, params: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key == "model" or key.startswith("_"):
                out[key] = value
            elif key in _NUMBERS:
                types, low, high = _NUMBERS[key]
                if isinstance(value, bool) or not isinstance(value, types):
                    raise JobInvalid(
                        f"{key}: must be {'an integer' if types == (int,) else 'a number'} (got {value!r})"
                    )
                if (low is not None and value < low) or (high is not None and value > high):
                    raise JobInvalid(f"{key}: must be between {low} and {high} (got {value})")
                out[key] = value
            elif key in _STRINGS:
                if not isinstance(value, str) or not value.strip():
                    raise JobInvalid(f"{key}: must be a non-empty string (got {value!r})")
                out[key] = value.strip()
            elif key in _FLAGS:
                if not isinstance(value, bool):
                    raise JobInvalid(f"{key}: must be true or false (got {value!r})")
                out[key] = value
            else:
                raise JobInvalid(f"{key}: unknown parameter for an audio job")
        backend = _backend(model_config)
        if backend == "seamless_m4t_v2" and "target_lang" not in out:
            raise JobInvalid("target_lang: required for SeamlessM4T models (e.g. 'eng')")
        if backend == "whisper" and out.get("target_lang", "en").lower() not in _ENGLISH:
            raise JobInvalid("target_lang: Whisper translates to English only")
        if backend == "hibiki" and out.get("cfg_coef", 1.0) != 1.0 and not model_config.get("conditioners"):
            raise JobInvalid("cfg_coef: this model has no description conditioning, keep it at 1")
        out.setdefault("seed", 42)
        return out

    def parse(self, data: bytes | None, params: dict[str, Any]) -> ParsedInput:
        if not data:
            raise JobInvalid("the input file is empty: list one audio file (bucket key) a line")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JobInvalid(f"the input file is not UTF-8 text: {exc}") from exc
        requests: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            req: dict[str, Any] = {"index": len(requests), "line": n, "input": line, "custom_id": None}
            if line[0] in '{["':
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    errors.append(
                        _error({"line": n, "input": line}, "invalid_json", f"not valid JSON: {exc.msg}")
                    )
                    continue
                key = obj if isinstance(obj, str) else obj.get("key") if isinstance(obj, dict) else None
                if not isinstance(key, str) or not key.strip():
                    errors.append(
                        _error(
                            {"line": n, "input": line},
                            "missing_key",
                            'expected a bucket key string or {"key": "...", "custom_id": "..."}',
                        )
                    )
                    continue
                req["input"] = key.strip()
                if isinstance(obj, dict) and obj.get("custom_id") is not None:
                    req["custom_id"] = str(obj["custom_id"])
            problem = _key_problem(req["input"], params.get("_owner"))
            if problem:
                errors.append(_error({"line": n, "input": req["input"]}, *problem))
                continue
            req["index"] = len(requests)
            requests.append(req)
        if not requests and not errors:
            raise JobInvalid("the input file lists no audio files")
        return ParsedInput(requests=requests, errors=errors)

    def run_chunk(
        self, engine: Any, requests: list[dict[str, Any]], ctx: ChunkContext, progress: Any = None
    ) -> ChunkResult:
        from workers.audio.engine import AudioItem
        from workers.audio.io import encode_wav

        errors: list[dict[str, Any]] = []
        items, kept = [], []
        for req in requests:
            try:
                data = ctx.bucket.get_bytes(req["input"])
            except (KeyError, ValueError, OSError) as exc:  # missing object or a key the bucket refuses
                errors.append(_error(req, "audio_not_found", f"cannot read {req['input']!r}: {exc}", 404))
                if progress is not None:
                    progress(1)
                continue
            items.append(AudioItem(req["input"], data=data))
            kept.append(req)
        params = {k: v for k, v in ctx.params.items() if not k.startswith("_") and k != "model"}
        if kept:
            params["seed"] = _chunk_seed(params.get("seed", 42), kept[0]["index"])
        run = engine.translate(items, params, progress=progress) if items else None
        results = []
        for req, outcome in zip(kept, run.outcomes if run else [], strict=False):
            if isinstance(outcome, ItemError):
                errors.append(_error(req, outcome.code, outcome.message, 422))
                continue
            audio_key = None
            if outcome.audio is not None and len(outcome.audio):
                audio_key = ctx.output_key(f"{req['index']:05d}.wav")
                ctx.bucket.put_bytes(audio_key, encode_wav(outcome.audio, outcome.sample_rate))
            results.append(
                {
                    "index": req["index"],
                    "line": req["line"],
                    "input": req["input"],
                    "custom_id": req["custom_id"],
                    "text": outcome.text,
                    "segments": [list(s) for s in outcome.segments],
                    "audio_key": audio_key,
                    "sample_rate": outcome.sample_rate or None,
                    "input_seconds": round(outcome.input_seconds, 3),
                }
            )
        return ChunkResult(results=results, errors=errors, metrics=list(run.metrics) if run else [])

    def finalize(self, ctx: FinalizeContext) -> dict[str, str]:
        rows: list[dict[str, Any]] = []
        # lines rejected while parsing sit next to the parts (the flow's layout: jobs/{id}/parse_errors.jsonl)
        parse_errors = ctx.output_key("x").rsplit("/outputs/", 1)[0] + "/parse_errors.jsonl"
        keys = [parse_errors] + [
            ctx.part_key(c, s) for c in range(ctx.num_chunks) for s in ("results.jsonl", "errors.jsonl")
        ]
        for key in keys:
            if ctx.bucket.exists(key):
                rows.extend(json.loads(x) for x in ctx.bucket.get_bytes(key).splitlines() if x.strip())
        index = []
        for row in sorted(rows, key=lambda r: r.get("line") or 0):
            entry = {
                "line": row.get("line"),
                "input": row.get("input"),
                "custom_id": row.get("custom_id"),
                "status": "error" if row.get("error") else "ok",
            }
            if row.get("error"):
                entry["error"] = row["error"]
            else:
                entry.update(text=row.get("text"), audio_key=row.get("audio_key"))
            index.append(entry)
        key = ctx.output_key("index.jsonl")
        ctx.bucket.put_bytes(key, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in index).encode())
        return {"index": key}


kind = AudioKind()
