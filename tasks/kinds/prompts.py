"""Prompt-file jobs: plain text (one prompt a line) or OpenAI Batch JSONL, answered in the OpenAI
Batch output shape. A bad line becomes an error-file entry naming the line; the job goes on.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from tasks.kinds.base import ChunkContext, ChunkResult, FinalizeContext, JobInvalid, ParsedInput
from workers.engine import ItemError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
DEFAULTS: dict[str, Any] = {"max_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": None, "stop": []}
MAX_STOP = 4


class LineError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _check_sampling(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Type- and range-check sampling fields; raise LineError naming the field."""
    out: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if name not in values or values[name] is None:
            continue
        v = values[name]
        if name in ("max_tokens", "top_k", "seed"):
            if isinstance(v, bool) or not isinstance(v, int):
                raise LineError("invalid_type", f"{where}{name} must be an integer, got {v!r}")
            if name == "max_tokens" and v < 1:
                raise LineError("invalid_value", f"{where}max_tokens must be at least 1, got {v}")
            if name == "top_k" and v < 0:
                raise LineError("invalid_value", f"{where}top_k must be 0 (off) or positive, got {v}")
        elif name in ("temperature", "top_p"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise LineError("invalid_type", f"{where}{name} must be a number, got {v!r}")
            if name == "temperature" and not 0 <= v <= 2:
                raise LineError("invalid_value", f"{where}temperature must be between 0 and 2, got {v}")
            if name == "top_p" and not 0 < v <= 1:
                raise LineError("invalid_value", f"{where}top_p must be in (0, 1], got {v}")
            v = float(v)
        elif name == "stop":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise LineError("invalid_type", f"{where}stop must be a non-empty string or a list of them")
            if len(v) > MAX_STOP:
                raise LineError("invalid_value", f"{where}stop takes at most {MAX_STOP} strings, got {len(v)}")
        out[name] = v
    return out


def _request_seed(job_seed: int, index: int) -> int:
    # randomness derives from (job seed, request index): independent of chunking and batching
    digest = hashlib.blake2b(f"{job_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_type", "body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LineError("invalid_type", f"body.messages[{i}] must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise LineError("invalid_type", f"body.messages[{i}].content: only text parts are supported")
            content = "".join(texts)
        if not isinstance(content, str):
            raise LineError("invalid_type", f"body.messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


def _parse_jsonl_line(raw: str, seen: set[str]) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LineError("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(obj, dict):
        raise LineError("invalid_type", "a line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "custom_id must be a non-empty string")
    if custom_id in seen:
        raise LineError("duplicate_custom_id", f"custom_id {custom_id!r} appears more than once")
    seen.add(custom_id)
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError("invalid_method", f"method must be POST, got {method!r}")
    url = obj.get("url")
    if url not in URLS:
        raise LineError("invalid_url", f"url must be one of {', '.join(URLS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_type", "body must be a JSON object")
    req: dict[str, Any] = {"custom_id": custom_id, "url": url, "prompt": None, "prompt_ids": None, "messages": None}
    if url == CHAT:
        req["messages"] = _parse_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise LineError("invalid_value", "body.prompt is empty")
            req["prompt"] = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            req["prompt_ids"] = prompt
        else:
            raise LineError("invalid_type", "body.prompt must be a string or a list of token ids")
    if "n" in body and body["n"] not in (None, 1):
        raise LineError("unsupported", "body.n: only n=1 is supported")
    req["params"] = _check_sampling(body, "body.")
    return req


def error_line(job_id: str, line: int, custom_id: str | None, code: str, message: str,
               status_code: int = 400) -> dict[str, Any]:
    return {
        "id": f"{job_id}-{line}",
        "custom_id": custom_id,
        "line": line,
        "response": {"status_code": status_code, "body": {"error": {"code": code, "message": message}}},
        "error": {"code": code, "message": f"line {line}: {message}"},
    }


class PromptsKind:
    name = "prompts"
    engine = "llm"
    needs_input_file = True

    def validate_params(self, params: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(SAMPLING_FIELDS) - {"format"}
        if unknown:
            raise JobInvalid(f"unknown parameter(s) for a prompt job: {', '.join(sorted(unknown))}")
        try:
            checked = _check_sampling(params, "")
        except LineError as e:
            raise JobInvalid(str(e)) from e
        fmt = params.get("format", "auto")
        if fmt not in ("auto", "text", "jsonl"):
            raise JobInvalid(f"format must be auto, text or jsonl, got {fmt!r}")
        out = {**DEFAULTS, **checked, "format": fmt}
        if out.get("seed") is None:
            out["seed"] = int.from_bytes(hashlib.blake2b(str(time.time_ns()).encode(), digest_size=4).digest(), "little")
        return out

    def parse(self, data: bytes | None, params: dict[str, Any], job_id: str = "job") -> ParsedInput:
        if data is None or not data.strip():
            raise JobInvalid("the prompt file is empty")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise JobInvalid(f"the prompt file is not UTF-8 text (byte {e.start})") from e
        lines = text.splitlines()  # tolerates CRLF
        fmt = params.get("format", "auto")
        if fmt == "auto":
            first = next((ln for ln in lines if ln.strip()), "")
            fmt = "jsonl" if first.lstrip().startswith("{") else "text"
        requests: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        job_params = {k: params[k] for k in SAMPLING_FIELDS if params.get(k) is not None and k != "seed"}
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            if fmt == "text":
                req = {"custom_id": f"line-{n}", "url": COMPLETIONS, "prompt": raw.rstrip("\r"),
                       "prompt_ids": None, "messages": None, "params": {}}
            else:
                try:
                    req = _parse_jsonl_line(raw, seen)
                except LineError as e:
                    cid = None
                    try:
                        obj = json.loads(raw)
                        cid = obj.get("custom_id") if isinstance(obj, dict) else None
                    except json.JSONDecodeError:
                        pass
                    errors.append(error_line(job_id, n, cid if isinstance(cid, str) else None, e.code, str(e)))
                    continue
            index = len(requests)
            merged = {**job_params, **req["params"]}
            merged.setdefault("seed", _request_seed(int(params.get("seed") or 0), index))
            req.update(index=index, line=n, params=merged)
            requests.append(req)
        if not requests and not errors:
            raise JobInvalid("the prompt file has no prompts (only blank lines)")
        return ParsedInput(requests=requests, errors=errors)

    def run_chunk(self, engine: Any, requests: list[dict[str, Any]], ctx: ChunkContext,
                  progress: Any = None) -> ChunkResult:
        from workers.llm.engine import GenRequest
        from workers.llm.sampling import SamplingParams

        gen_requests: list[Any] = []
        bad: dict[int, ItemError] = {}
        for i, req in enumerate(requests):
            p = req["params"]
            try:
                sp = SamplingParams(max_tokens=p.get("max_tokens", DEFAULTS["max_tokens"]),
                                    temperature=p.get("temperature", 1.0), top_k=p.get("top_k") or None,
                                    top_p=p.get("top_p", 1.0), stop=list(p.get("stop") or []), seed=p.get("seed"))
            except ValueError as e:
                bad[i] = ItemError("invalid_value", str(e))
                sp = SamplingParams()
            gen_requests.append(GenRequest(prompt=req.get("prompt"), messages=req.get("messages"),
                                           prompt_ids=req.get("prompt_ids"), params=sp))
        good = [i for i in range(len(requests)) if i not in bad]
        run = engine.generate([gen_requests[i] for i in good], progress=progress)
        outcomes: list[Any] = [None] * len(requests)
        for i, outcome in zip(good, run.outcomes):
            outcomes[i] = outcome
        for i, err in bad.items():
            outcomes[i] = err
        model_name = ctx.params.get("_model_name", "genmill")
        created = int(time.time())
        results, errors = [], []
        for req, outcome in zip(requests, outcomes):
            if isinstance(outcome, ItemError):
                errors.append(error_line(ctx.job_id, req["line"], req["custom_id"], outcome.code, outcome.message))
                continue
            results.append(self._output_line(ctx.job_id, req, outcome, model_name, created))
        return ChunkResult(results=results, errors=errors, metrics=list(run.metrics))

    @staticmethod
    def _output_line(job_id: str, req: dict[str, Any], c: Any, model: str, created: int) -> dict[str, Any]:
        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "total_tokens": c.prompt_tokens + c.completion_tokens}
        rid = f"{job_id}-{req['line']}"
        if req["url"] == CHAT:
            body = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason}], "usage": usage}
        else:
            body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": usage}
        return {"id": rid, "custom_id": req["custom_id"], "line": req["line"],
                "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}

    def finalize(self, ctx: FinalizeContext) -> dict[str, str]:
        return {}
