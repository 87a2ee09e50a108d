"""Prompt-file parsing: what a user's file turns into, and how bad lines are reported."""
import json

import pytest

from tasks.kinds.base import JobInvalid
from tasks.kinds.prompts import PromptsKind

KIND = PromptsKind()


def params(**kw):
    return KIND.validate_params(kw, {})


def line(custom_id, prompt="hi", url="/v1/completions", **body):
    b = {"model": "m", **body}
    if url == "/v1/chat/completions":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": b})


def test_text_file_one_prompt_a_line_blank_lines_skipped_crlf_tolerated():
    parsed = KIND.parse(b"first prompt\r\n\r\nsecond prompt\r\n  \nthird\n", params())
    assert [r["prompt"] for r in parsed.requests] == ["first prompt", "second prompt", "third"]
    assert [r["line"] for r in parsed.requests] == [1, 3, 5]
    assert [r["index"] for r in parsed.requests] == [0, 1, 2]
    assert [r["custom_id"] for r in parsed.requests] == ["line-1", "line-3", "line-5"]
    assert parsed.errors == []


def test_jsonl_completions_and_chat_with_body_overriding_job_params():
    data = "\n".join([line("a", max_tokens=5, temperature=0), line("b", url="/v1/chat/completions", stop="END")])
    parsed = KIND.parse(data.encode(), params(max_tokens=9, temperature=0.5))
    a, b = parsed.requests
    assert a["prompt"] == "hi" and a["params"]["max_tokens"] == 5 and a["params"]["temperature"] == 0.0
    assert b["messages"] == [{"role": "user", "content": "hi"}]
    assert b["params"]["max_tokens"] == 9 and b["params"]["temperature"] == 0.5 and b["params"]["stop"] == ["END"]


def test_bad_lines_become_errors_naming_line_and_reason_and_the_rest_parse():
    rows = [
        line("ok-1"),
        '{"custom_id": "broken", "body": ',  # invalid JSON
        line("typed", temperature="hot"),  # wrong type
        line("ok-1"),  # duplicate custom_id
        line("badurl", url="/v1/embeddings"),
        line("ok-2", max_tokens=0),  # out of range
        line("ok-3"),
    ]
    parsed = KIND.parse("\n".join(rows).encode(), params())
    assert [r["custom_id"] for r in parsed.requests] == ["ok-1", "ok-3"]
    by_line = {e["line"]: e for e in parsed.errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6]
    assert by_line[2]["error"]["code"] == "invalid_json"
    assert by_line[3]["error"]["code"] == "invalid_type" and "temperature" in by_line[3]["error"]["message"]
    assert by_line[4]["error"]["code"] == "duplicate_custom_id" and by_line[4]["custom_id"] == "ok-1"
    assert by_line[5]["error"]["code"] == "invalid_url"
    assert "max_tokens" in by_line[6]["error"]["message"]
    assert all(e["error"]["message"].startswith(f"line {n}:") for n, e in by_line.items())


def test_per_request_seeds_depend_on_job_seed_and_index_only():
    data = "\n".join(f"prompt {i}" for i in range(10)).encode()
    a = KIND.parse(data, params(seed=1))
    b = KIND.parse(data, params(seed=1))
    c = KIND.parse(data, params(seed=2))
    seeds_a = [r["params"]["seed"] for r in a.requests]
    assert seeds_a == [r["params"]["seed"] for r in b.requests]
    assert seeds_a != [r["params"]["seed"] for r in c.requests]
    assert len(set(seeds_a)) == 10
    explicit = KIND.parse(line("x", seed=42).encode(), params(seed=1))
    assert explicit.requests[0]["params"]["seed"] == 42


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\n \n\r\n", "empty"),
    (b"\xff\xfe\x00bad", "UTF-8"),
])
def test_bad_file_fails_the_job_with_a_clear_message(data, message):
    with pytest.raises(JobInvalid, match=message):
        KIND.parse(data, params())


@pytest.mark.parametrize("bad, name", [
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_job_params_name_the_parameter(bad, name):
    with pytest.raises(JobInvalid, match=name):
        KIND.validate_params(bad, {})
